package gateway

import (
	"context"
	"net/http"
	"strconv"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Tracing: one server span per request, honouring an incoming W3C
// traceparent; completion requests add an admission span and dispatch and
// first-token events, and hand the trace context to the worker through
// infer.Request.TraceParent so that its prefill and decode spans become
// children of the server span. With the default no-op provider every span
// is non-recording and nothing is allocated for export.

const tracerName = "h3infer/gateway"

// traceContext is the only propagation format the gateway speaks.
var traceContext = propagation.TraceContext{}

func (g *Gateway) serverSpan(r *http.Request) (*http.Request, trace.Span) {
	ctx := traceContext.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	ctx, span := g.tracer.Start(ctx, r.Method+" "+r.URL.Path, trace.WithSpanKind(trace.SpanKindServer))
	if !span.IsRecording() {
		return r.WithContext(ctx), span
	}
	span.SetAttributes(
		attribute.String("http.request.method", r.Method),
		attribute.String("url.path", r.URL.Path),
		attribute.String("network.protocol.name", "http"),
		attribute.String("network.protocol.version", protocolLabel(r)),
	)
	return r.WithContext(ctx), span
}

func endServerSpan(span trace.Span, r *http.Request, status int) {
	if span.IsRecording() {
		span.SetName(r.Method + " " + routeLabel(r.Pattern))
		span.SetAttributes(attribute.String("http.route", routeLabel(r.Pattern)),
			attribute.Int("http.response.status_code", status))
		switch {
		case status == statusClientClosed:
			span.AddEvent("cancelled", trace.WithAttributes(attribute.String("reason", "client closed the request")))
		case status >= 500:
			span.SetStatus(codes.Error, strconv.Itoa(status))
		}
	}
	span.End()
}

// traceParent renders ctx's span context for the worker, "" when there is
// none to continue.
func traceParent(ctx context.Context) string {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return ""
	}
	c := propagation.MapCarrier{}
	traceContext.Inject(ctx, c)
	return c["traceparent"]
}
