// Package infer is the vocabulary every part of h3infer speaks about one
// inference: the request a backend runs, the events it answers with, the
// error codes a client may see, and the models a backend serves.
//
// The scheduler, the gateway, the worker ring and any future backend meet
// here, so a backend is anything that can turn a Request into a Call. The
// package imports nothing of h3infer's but priority, the other half of the
// vocabulary; how these values travel (the shared-memory frames of
// transport, say) is the carrier's business.
package infer

import (
	"time"

	"h3infer/priority"
)

// ChatMessage is one turn of a chat conversation.
type ChatMessage struct {
	Role    string
	Content string
	// ToolCalls are the calls an assistant message made, earlier in the
	// conversation; ToolCallID is the call a "tool" message answers.
	ToolCalls  []ToolCall
	ToolCallID string
}

// ToolCall is one call of a function a model made.
type ToolCall struct {
	ID   string
	Name string
	// Arguments is the call's arguments as JSON text (an object).
	Arguments string
}

// ToolCallDelta is part of a tool call a backend is answering with, as
// OpenAI streams them: a call's first delta has its Index, ID and Name,
// and the Arguments of every delta with the same Index, concatenated in
// order, are its arguments.
type ToolCallDelta struct {
	Index     uint32
	ID        string
	Name      string
	Arguments string
}

// Values of Request.ToolChoice, OpenAI's tool_choice; "" is ToolAuto.
const (
	ToolAuto     = "auto"     // the model may call tools or answer
	ToolNone     = "none"     // the model answers in text; the tools are not offered
	ToolRequired = "required" // the model calls one of the tools
	ToolFunction = "function" // the model calls the function ToolName
)

// Request asks a backend to generate for one prompt. Exactly one of Prompt
// (a raw completion prompt) and Messages (a chat, formatted by the model's
// chat template where the model runs) is set.
type Request struct {
	Model       string
	Prompt      string
	Messages    []ChatMessage
	MaxTokens   uint32  // 0: up to the model's context
	Temperature float32 // 0: greedy
	TopP        float32 // 0 or 1: no nucleus cut
	// Sampling beyond temperature and top_p, with OpenAI's and vLLM's
	// meanings; each one's zero value leaves the logits alone. The model's
	// runner applies them per sequence, on the logits of each step, in
	// this order: LogitBias; RepetitionPenalty (over the prompt's and the
	// completion's tokens); PresencePenalty and FrequencyPenalty (over
	// the completion's); the temperature; then the TopK, MinP and TopP
	// cuts. Greedy decoding (temperature 0) takes the argmax of the
	// biased and penalized logits.
	TopK              uint32      // keep the k most likely tokens; 0: all
	MinP              float32     // drop tokens below MinP times the most likely one's probability; 0: none
	PresencePenalty   float32     // subtracted once from each token the completion holds
	FrequencyPenalty  float32     // subtracted per occurrence in the completion
	RepetitionPenalty float32     // divides positive, multiplies negative logits of tokens seen; 0 or 1: off
	LogitBias         []LogitBias // added to the named tokens' logits; ascending, unique tokens
	// Logprobs asks for each generated token's log probability, and
	// TopLogprobs (at most MaxTopLogprobs) for that many of the most
	// likely tokens at its step: the log-softmax of the logits after
	// LogitBias and the penalties, before the temperature and the cuts,
	// so that greedy decoding's choice is the first of them.
	Logprobs    bool
	TopLogprobs uint8
	Seed        uint64
	HasSeed     bool
	Stop        []string
	// IgnoreEOS keeps generating past the model's end tokens (eos_token,
	// stop_tokens, a template's end of turn) up to MaxTokens, so that a
	// benchmark's output lengths are the ones it asked for. Stop strings
	// still apply.
	IgnoreEOS bool
	// ResponseFormat is OpenAI's response_format as the client wrote it,
	// compacted, when it asks for JSON (json_object or json_schema); ""
	// otherwise. The model's runner compiles it (package constrain) and
	// masks, at each step after LogitBias and the penalties, every token
	// that would not keep the completion a prefix of a document it
	// accepts: the logprobs are those of the masked logits, and the
	// completion ends ("stop") as soon as the document is complete.
	ResponseFormat string
	// Urgency is the RFC 9218 urgency the request runs at, and Class what
	// that urgency means to every stage on the way (priority.Classes): both
	// are decided once, at admission, and only read afterwards.
	Urgency     priority.Urgency
	Class       priority.Class
	TraceParent string
	// N is how many choices to generate for the prompt, each sampled
	// on its own (choice i with ChoiceSeed(Seed, i) when HasSeed); 0 and
	// 1 mean one. The prompt is prefilled once and its cache copied into
	// the other choices' rows, so the request takes N of a backend's
	// slots (Slots). A request with N > 1 gets each choice's tokens with
	// their Token.Index, the last with the choice's Token.FinishReason,
	// and then one Done for all of them.
	N uint32
	// Tools is OpenAI's tools as a JSON array of {"type":"function",
	// "function":{"name","description","parameters"}}, checked and
	// compacted by the gateway; "" when the request has none. The
	// model's chat template is given them, and the backend answers a
	// call the model makes as Token.ToolCalls. ToolChoice (one of the
	// Tool* values) and ToolName (with ToolFunction) say whether the
	// model may, must or must not call one: with ToolRequired and
	// ToolFunction the model's runner constrains the completion to a
	// call whose arguments the function's parameters accept.
	// SerialToolCalls is parallel_tool_calls false: at most one call.
	Tools           string
	ToolChoice      string
	ToolName        string
	SerialToolCalls bool
	// Embed, when set, asks an encoder model (ModelInfo.Encoder) for the
	// vectors of its inputs instead of a completion: the call answers
	// with Embedding events, then Done with the inputs' tokens as
	// PromptTokens. Only Model, Urgency, Class and TraceParent apply
	// beside it.
	Embed *EmbedRequest
}

// MaxChoices bounds Request.N: a request's choices run as rows of one
// worker's batch, so it can never ask for more than a worker's slots,
// and the gateway refuses more than this whatever the workers have.
const MaxChoices = 16

// Slots is how many of a backend's slots r takes: one per choice.
func (r *Request) Slots() int { return max(int(r.N), 1) }

// ChoiceSeed is the seed choice i of a request seeded with seed samples
// with: the seed itself for choice 0, so that the first choice is the
// answer the same request with one choice gets, and for the others a
// splitmix64 scramble of seed and i, so that they differ from each
// other and from any other request's choice 0 with a nearby seed.
func ChoiceSeed(seed uint64, i int) uint64 {
	if i == 0 {
		return seed
	}
	z := seed + uint64(i)*0x9e3779b97f4a7c15
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// EmbedRequest is what an embedding request asks beside its model:
// exactly one of Texts (tokenized where the model runs, with the special
// tokens its tokenizer adds) and Tokens (token ids, as given).
type EmbedRequest struct {
	Texts  []string
	Tokens [][]uint32
	// Dimensions shortens every vector to its first Dimensions values,
	// normalized again when the model normalizes; 0 keeps the model's
	// own length. Only a Matryoshka model allows it.
	Dimensions uint32
}

// Len is the number of inputs.
func (e *EmbedRequest) Len() int { return len(e.Texts) + len(e.Tokens) }

// Bounds of an embedding request, as OpenAI bounds its own: at most
// MaxEmbedInputs inputs and MaxEmbedTokens tokens in all; each input
// within the model's context length.
const (
	MaxEmbedInputs = 2048
	MaxEmbedTokens = 300_000
)

// Embedding carries vectors of an embedding request, in input order:
// Vectors[i] is input Index+i's. A backend may answer in several such
// events, each continuing where the last one stopped.
type Embedding struct {
	Index   uint32
	Vectors [][]float32
}

// LogitBias adds Bias to the logit of token id Token at every step.
type LogitBias struct {
	Token uint32
	Bias  float32
}

// MaxTopLogprobs bounds Request.TopLogprobs, as OpenAI does.
const MaxTopLogprobs = 20

// TokenLogprob is one generated token's log probability, with the most
// likely tokens at its step when the request asked for them.
type TokenLogprob struct {
	// Token is the token's own text as the model's vocabulary holds it,
	// which may be part of a UTF-8 character.
	Token   string
	Logprob float32
	Top     []TopLogprob // most likely first
}

// TopLogprob is one of the most likely tokens at a step.
type TopLogprob struct {
	Token   string
	Logprob float32
}

// Token carries one or more generated tokens and the text they complete.
// Text may be empty while the detokenizer holds back half a UTF-8 character
// or a possible stop sequence; Count still says how many tokens were made.
type Token struct {
	Count uint32
	Text  string
	// Logprobs, when the request asked for them, has one entry per
	// token made, in order (len(Logprobs) == Count).
	Logprobs []TokenLogprob
	// Index is the choice the tokens belong to, for a request with
	// N > 1; 0 otherwise. FinishReason, set on a choice's last tokens,
	// says why that choice ended; the request's Done follows once every
	// choice has ended. A request with one choice never sets it.
	Index        uint32
	FinishReason string
	// ToolCalls are the parts of tool calls these tokens completed; the
	// text of a call is not in Text.
	ToolCalls []ToolCallDelta
}

// Finish reasons, as the OpenAI API names them.
const (
	FinishStop   = "stop"
	FinishLength = "length"
	// FinishToolCalls ends a completion whose answer is tool calls.
	FinishToolCalls = "tool_calls"
)

// Done ends a request normally. For a request with N > 1 the prompt
// is counted once, CompletionTokens over every choice, and FinishReason
// is choice 0's (each choice's own came with its last Token).
type Done struct {
	FinishReason     string
	PromptTokens     uint32
	CompletionTokens uint32
}

// Error codes a backend ends a request with; the gateway maps each to an
// HTTP status in one place (gateway/errors.go).
const (
	CodeContextLength  = "context_length_exceeded"
	CodeModelNotFound  = "model_not_found"
	CodeInvalidRequest = "invalid_request"
	CodeInternal       = "internal_error"
	CodeCancelled      = "cancelled"
	// CodeWorkerLost ends a call whose backend died or whose carrier
	// failed. The gateway's side makes it, never the backend; a request
	// that gets it before any other event never started and may run
	// elsewhere.
	CodeWorkerLost = "worker_lost"
	// CodeOverflow ends a call whose consumer fell behind the events its
	// carrier buffers. The gateway's side makes it; no backend sends it.
	CodeOverflow = "overflow"
	// CodeUpstreamLost ends a call whose remote backend (an upstream
	// server) failed: the connection broke, the response was not one, or
	// its stream ended without an end. The gateway's side makes it.
	CodeUpstreamLost = "upstream_lost"
	// CodeRateLimited and CodeOverloaded pass on a remote backend's own
	// refusal (HTTP 429 and 503), with its Retry-After.
	CodeRateLimited = "rate_limit_exceeded"
	CodeOverloaded  = "overloaded"
	// CodeTimeout ends a call whose backend took longer than it may: a
	// remote backend's request timeout, or a stream that stalled.
	CodeTimeout = "timeout"
)

// Error ends a request with a failure.
type Error struct {
	Code    string
	Message string
	// RetryAfter is the backend's advice on when to ask again (a remote
	// backend's Retry-After); 0 when it gave none.
	RetryAfter time.Duration
	// Unstarted says the backend refused the request or failed before it
	// began to answer, and is otherwise well: another backend of the same
	// model may run the request instead. A lost worker is not Unstarted
	// (its slot is gone with it; see CodeWorkerLost).
	Unstarted bool
}

// Event is one thing that happened to a call. Exactly one of the following
// holds: Done != nil (finished), Err != nil (failed), Embedding != nil
// (vectors of an embedding request, which a Done follows), or none of
// them (Token).
type Event struct {
	Token     Token
	Done      *Done
	Err       *Error
	Embedding *Embedding
}

// Call is one request in flight on a backend.
type Call interface {
	// Events delivers the call's events. The channel is closed right after
	// the terminal event (Done or Err), or at once by Cancel.
	Events() <-chan Event
	// Cancel ends the call if it has not ended: the events channel is
	// closed with no further events and the backend is told to stop. It
	// never blocks and is safe to call more than once, from any goroutine.
	Cancel()
}

// ModelInfo describes one model a backend serves.
type ModelInfo struct {
	Name          string
	ContextLength uint32
	// Encoder says the model answers embedding requests (Request.Embed)
	// and generates no text. EmbeddingSize is the length of its vectors,
	// 0 where the backend does not know it; Matryoshka says they may be
	// shortened (EmbedRequest.Dimensions).
	Encoder       bool
	EmbeddingSize uint32
	Matryoshka    bool
}
