package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"h3infer/infer"
	"h3infer/scheduler"
	"h3infer/tlsbind"
)

// The gateway's own failures. Handlers return these (or errors from the
// scheduler and workers) and apiErrorOf alone decides what the client sees.

// invalidParam is a request the gateway refuses to run.
type invalidParam struct {
	param   string // the request field at fault, "" when none
	code    string // OpenAI-style code, "" for null
	message string
}

func (e *invalidParam) Error() string { return e.message }

func invalidf(param, format string, args ...any) error {
	return &invalidParam{param: param, message: fmt.Sprintf(format, args...)}
}

// unknownModel names a model no worker serves.
type unknownModel struct{ model string }

func (e *unknownModel) Error() string { return fmt.Sprintf("model %q does not exist", e.model) }

// methodNotAllowed answers a route called with the wrong method.
type methodNotAllowed struct {
	method string
	allow  string
}

func (e *methodNotAllowed) Error() string {
	return fmt.Sprintf("method %s is not allowed here; use %s", e.method, e.allow)
}

// workerFailure is an error event a worker sent for a request.
type workerFailure struct {
	err         infer.Error
	promptParam string // "messages" or "prompt": what a context-length error is about
}

func (e *workerFailure) Error() string {
	return fmt.Sprintf("worker: %s: %s", e.err.Code, e.err.Message)
}

// adminMisdirected is an admin request whose Host names another server:
// what a DNS-rebinding page sends.
type adminMisdirected struct{ host string }

func (e *adminMisdirected) Error() string {
	return fmt.Sprintf("the admin listener does not answer to host %q", e.host)
}

// adminCrossOrigin is an admin request a browser marked as sent by a page
// of another origin.
type adminCrossOrigin struct{ from string }

func (e *adminCrossOrigin) Error() string {
	return fmt.Sprintf("the admin listener refuses cross-origin requests (%s)", e.from)
}

// unsupportedMediaType is a request body of a type the route does not take.
type unsupportedMediaType struct{ got, want string }

func (e *unsupportedMediaType) Error() string {
	return fmt.Sprintf("Content-Type must be %s, got %q", e.want, e.got)
}

// Sentinels for failures that carry nothing more.
var (
	errRouteNotFound = errors.New("no such route")
	errNotReady      = errors.New("no worker is ready yet")
	errNoResult      = errors.New("the worker stream ended without a result")
	// errDeadlinePassed is the cause of a request context whose deadline
	// (default or X-Request-Timeout) passed.
	errDeadlinePassed = errors.New("the request's deadline passed")
	// errShuttingDown ends the requests still running when a shutdown's
	// grace period is over.
	errShuttingDown = errors.New("the server is shutting down")
	// errAdminToken is an admin request without the configured admin token.
	errAdminToken = errors.New("admin token required")
)

// apiError is what the client receives: a status, optional headers and the
// OpenAI error object.
type apiError struct {
	status       int
	retryAfter   time.Duration // sets Retry-After when > 0
	allow        string        // sets Allow when not ""
	authenticate string        // sets WWW-Authenticate when not ""
	limited      *rateLimited  // sets the RateLimit headers
	body         errorObject
}

type errorObject struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

// statusClientClosed labels requests whose client left before an answer.
// Nothing is written for them; the number exists for metrics and logs.
const statusClientClosed = 499

// apiErrorOf is the one place where errors become HTTP statuses.
func apiErrorOf(err error) apiError {
	mk := func(status int, typ, param, code, msg string) apiError {
		e := apiError{status: status, body: errorObject{Message: msg, Type: typ}}
		if param != "" {
			e.body.Param = &param
		}
		if code != "" {
			e.body.Code = &code
		}
		return e
	}
	const (
		invalidRequest = "invalid_request_error"
		serverError    = "server_error"
	)

	var (
		invalid     *invalidParam
		unknown     *unknownModel
		method      *methodNotAllowed
		tooLarge    *http.MaxBytesError
		syntax      *json.SyntaxError
		jsonType    *json.UnmarshalTypeError
		overload    *scheduler.OverloadError
		tenantLimit *scheduler.TenantLimitError
		worker      *workerFailure
		limited     *rateLimited
		misdirected *adminMisdirected
		crossOrigin *adminCrossOrigin
		mediaType   *unsupportedMediaType
		noTokenizer *NoTokenizerError
		choices     *scheduler.ChoicesError
		// A Router's or ModelAdmin's refusal of a model or version that
		// does not exist says so with NotFound.
		missingVersion interface {
			error
			NotFound() bool
		}
	)
	// RFC 6750 section 3: the challenge names the realm and why.
	challenge := func(e apiError, code string) apiError {
		e.authenticate = `Bearer realm="h3infer"`
		if code != "" {
			e.authenticate += fmt.Sprintf(`, error=%q, error_description=%q`, code, e.body.Message)
		}
		return e
	}
	switch {
	case errors.Is(err, context.Canceled):
		return apiError{status: statusClientClosed}
	case errors.Is(err, tlsbind.ErrNoToken):
		return challenge(mk(http.StatusUnauthorized, invalidRequest, "", "missing_token",
			"an Authorization: Bearer token is required"), "")
	case errors.Is(err, tlsbind.ErrNoBinding), errors.Is(err, tlsbind.ErrBadBinding):
		return challenge(mk(http.StatusUnauthorized, invalidRequest, "", "binding_failed", err.Error()), "invalid_token")
	case errors.Is(err, tlsbind.ErrMalformed), errors.Is(err, tlsbind.ErrSecretSent),
		errors.Is(err, tlsbind.ErrUnknownKey), errors.Is(err, tlsbind.ErrBadSignature),
		errors.Is(err, tlsbind.ErrExpired), errors.Is(err, tlsbind.ErrNotYetValid),
		errors.Is(err, tlsbind.ErrWrongAudience):
		return challenge(mk(http.StatusUnauthorized, invalidRequest, "", "invalid_token", err.Error()), "invalid_token")
	case errors.Is(err, errNoScope):
		// RFC 6750: a valid token without the right scope is 403.
		return challenge(mk(http.StatusForbidden, invalidRequest, "model", "model_not_allowed", err.Error()), "insufficient_scope")
	case errors.Is(err, tlsbind.ErrReplayed):
		return mk(http.StatusTooEarly, invalidRequest, "", "replayed", err.Error())
	case errors.Is(err, tlsbind.ErrBadProof), errors.Is(err, tlsbind.ErrStaleProof):
		return mk(http.StatusTooEarly, invalidRequest, "", "early_proof_rejected", err.Error()+"; retry after the handshake")
	case errors.Is(err, errTooEarly):
		return mk(http.StatusTooEarly, invalidRequest, "", "too_early", err.Error())
	case errors.Is(err, errAdminToken):
		e := mk(http.StatusUnauthorized, invalidRequest, "", "admin_token_required", err.Error())
		e.authenticate = `Bearer realm="h3infer-admin"`
		return e
	case errors.As(err, &misdirected):
		// RFC 9110 section 15.5.20: this server will not answer for that
		// authority.
		return mk(http.StatusMisdirectedRequest, invalidRequest, "", "misdirected_request", misdirected.Error())
	case errors.As(err, &crossOrigin):
		return mk(http.StatusForbidden, invalidRequest, "", "cross_origin", crossOrigin.Error())
	case errors.As(err, &mediaType):
		return mk(http.StatusUnsupportedMediaType, invalidRequest, "", "unsupported_media_type", mediaType.Error())
	case errors.As(err, &invalid):
		return mk(http.StatusBadRequest, invalidRequest, invalid.param, invalid.code, invalid.message)
	case errors.As(err, &choices):
		return mk(http.StatusBadRequest, invalidRequest, "n", "",
			fmt.Sprintf("n: %d choices run together on one model worker, and at most %d are open to this request", choices.Choices, choices.Most))
	case errors.As(err, &tooLarge):
		return mk(http.StatusRequestEntityTooLarge, invalidRequest, "", "request_too_large",
			fmt.Sprintf("request body exceeds %d bytes", tooLarge.Limit))
	case errors.As(err, &syntax):
		return mk(http.StatusBadRequest, invalidRequest, "", "invalid_json",
			"the request body is not valid JSON: "+syntax.Error())
	case errors.As(err, &jsonType):
		param := jsonType.Field
		return mk(http.StatusBadRequest, invalidRequest, param, "invalid_type",
			fmt.Sprintf("%s: expected %s, got JSON %s", param, jsonType.Type, jsonType.Value))
	case errors.As(err, &noTokenizer):
		return mk(http.StatusBadRequest, invalidRequest, "model", "tokenizer_unavailable", noTokenizer.Error())
	case errors.As(err, &unknown):
		return mk(http.StatusNotFound, invalidRequest, "model", infer.CodeModelNotFound, unknown.Error())
	case errors.As(err, &missingVersion) && missingVersion.NotFound():
		return mk(http.StatusNotFound, invalidRequest, "model", infer.CodeModelNotFound, missingVersion.Error())
	case errors.As(err, &method):
		e := mk(http.StatusMethodNotAllowed, invalidRequest, "", "method_not_allowed", method.Error())
		e.allow = method.allow
		return e
	case errors.Is(err, errRouteNotFound):
		return mk(http.StatusNotFound, invalidRequest, "", "not_found", "no such route")
	case errors.As(err, &limited):
		e := mk(http.StatusTooManyRequests, "rate_limit_error", "", "rate_limit_exceeded",
			fmt.Sprintf("rate limit reached for %s; retry later", limited.limit))
		e.retryAfter = max(limited.retryAfter, time.Second)
		e.limited = limited
		return e
	case errors.As(err, &overload):
		e := mk(http.StatusServiceUnavailable, serverError, "", "overloaded",
			"the server is overloaded; retry later")
		e.retryAfter = overload.RetryAfter
		return e
	case errors.Is(err, scheduler.ErrOverloaded):
		e := mk(http.StatusServiceUnavailable, serverError, "", "overloaded",
			"the server is overloaded; retry later")
		e.retryAfter = scheduler.DefaultRetryAfter
		return e
	case errors.Is(err, errNotReady):
		e := mk(http.StatusServiceUnavailable, serverError, "", "not_ready",
			"no model worker is ready yet; retry shortly")
		e.retryAfter = scheduler.DefaultRetryAfter
		return e
	case errors.Is(err, scheduler.ErrClosed), errors.Is(err, errShuttingDown):
		return mk(http.StatusServiceUnavailable, serverError, "", "shutting_down", "the server is shutting down")
	case errors.As(err, &tenantLimit):
		e := mk(http.StatusTooManyRequests, "rate_limit_error", "", "tenant_queue_full",
			"too many of your requests are waiting; retry later")
		e.retryAfter = tenantLimit.RetryAfter
		return e
	case errors.Is(err, errDeadlinePassed):
		return mk(http.StatusGatewayTimeout, serverError, "", "timeout", "the request's deadline passed")
	case errors.Is(err, scheduler.ErrDeadline), errors.Is(err, context.DeadlineExceeded):
		return mk(http.StatusGatewayTimeout, serverError, "", "timeout",
			"no model worker became free in time")
	case errors.As(err, &worker):
		switch worker.err.Code {
		case infer.CodeContextLength:
			return mk(http.StatusBadRequest, invalidRequest, worker.promptParam, infer.CodeContextLength, worker.err.Message)
		case infer.CodeModelNotFound:
			return mk(http.StatusNotFound, invalidRequest, "model", infer.CodeModelNotFound, worker.err.Message)
		case infer.CodeInvalidRequest:
			return mk(http.StatusBadRequest, invalidRequest, paramNamed(worker.err.Message), "invalid_request", worker.err.Message)
		case infer.CodeCancelled:
			return mk(http.StatusServiceUnavailable, serverError, "", infer.CodeCancelled, "the model worker stopped the request")
		case infer.CodeWorkerLost:
			e := mk(http.StatusServiceUnavailable, serverError, "", infer.CodeWorkerLost,
				"the model worker serving this request stopped; retry")
			e.retryAfter = scheduler.DefaultRetryAfter
			return e
		case infer.CodeOverflow:
			// The gateway fell behind its own client's stream.
			return mk(http.StatusServiceUnavailable, serverError, "", "overloaded", "the response stream fell behind")
		// An upstream server's own answers, passed on with its advice.
		case infer.CodeRateLimited:
			e := mk(http.StatusTooManyRequests, "rate_limit_error", "", infer.CodeRateLimited, worker.err.Message)
			e.retryAfter = max(worker.err.RetryAfter, time.Second)
			return e
		case infer.CodeOverloaded:
			e := mk(http.StatusServiceUnavailable, serverError, "", infer.CodeOverloaded, worker.err.Message)
			e.retryAfter = max(worker.err.RetryAfter, time.Second)
			return e
		case infer.CodeTimeout:
			return mk(http.StatusGatewayTimeout, serverError, "", infer.CodeTimeout, worker.err.Message)
		case infer.CodeUpstreamLost:
			e := mk(http.StatusBadGateway, serverError, "", infer.CodeUpstreamLost, worker.err.Message)
			e.retryAfter = max(worker.err.RetryAfter, scheduler.DefaultRetryAfter)
			return e
		}
		// Internal worker errors are not the client's business in detail.
		return mk(http.StatusInternalServerError, serverError, "", infer.CodeInternal, "the model worker failed")
	}
	return mk(http.StatusInternalServerError, serverError, "", infer.CodeInternal, "internal error")
}

// writeError answers a request with err unless the client has gone, and
// returns the status for metrics.
func writeError(w http.ResponseWriter, err error) int {
	e := apiErrorOf(err)
	if e.status == statusClientClosed {
		return e.status
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	if e.retryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(int(math.Ceil(e.retryAfter.Seconds()))))
	}
	if e.allow != "" {
		h.Set("Allow", e.allow)
	}
	if e.authenticate != "" {
		h.Set("WWW-Authenticate", e.authenticate)
	}
	if e.limited != nil {
		rateLimitHeaders(h, e.limited)
	}
	w.WriteHeader(e.status)
	body, _ := json.Marshal(struct {
		Error errorObject `json:"error"`
	}{e.body})
	w.Write(append(body, '\n'))
	return e.status
}

// errorEvent is the SSE event that ends a stream which fails after its
// headers went out, so the client never mistakes it for a complete answer.
func errorEvent(err error) []byte {
	e := apiErrorOf(err)
	body, _ := json.Marshal(struct {
		Error errorObject `json:"error"`
	}{e.body})
	return sseData(body)
}

// workerParams are the request parameters a worker's refusal may be
// about: those only the model can check (a token id against its
// vocabulary, a conversation against its chat template).
var workerParams = []string{"logit_bias", "logprobs", "top_logprobs", "messages", "prompt", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "stop", "n", "tools", "tool_choice"}

// paramNamed is the parameter a worker's refusal names first ("logit_bias:
// token 70000 is not in ..."), or "" when it names none of workerParams.
func paramNamed(msg string) string {
	name, _, ok := strings.Cut(msg, ":")
	if ok && slices.Contains(workerParams, name) {
		return name
	}
	return ""
}
