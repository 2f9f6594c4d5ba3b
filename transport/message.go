package transport

// The messages below are the payloads of frames. Their binary encoding lives
// in frame.go; every decoder is fuzzed.

// ChatMessage is one turn of a chat conversation.
type ChatMessage struct {
	Role    string
	Content string
}

// Submit asks a worker to start generating for one request. Exactly one of
// Prompt (a raw completion prompt) and Messages (a chat, formatted by the
// model's chat template in the worker) is set.
type Submit struct {
	Model       string
	Prompt      string
	Messages    []ChatMessage
	MaxTokens   uint32  // 0: up to the model's context
	Temperature float32 // 0: greedy
	TopP        float32 // 0 or 1: no nucleus cut
	Seed        uint64
	HasSeed     bool
	Stop        []string
	// IgnoreEOS keeps generating past the model's end tokens (eos_token,
	// stop_tokens, a template's end of turn) up to MaxTokens, so that a
	// benchmark's output lengths are the ones it asked for. Stop strings
	// still apply.
	IgnoreEOS   bool
	Urgency     uint8 // RFC 9218 urgency, 0 most urgent
	TraceParent string
}

// Token carries one or more generated tokens and the text they complete.
// Text may be empty while the detokenizer holds back half a UTF-8 character
// or a possible stop sequence; Count still says how many tokens were made.
type Token struct {
	Count uint32
	Text  string
}

// Finish reasons, as the OpenAI API names them.
const (
	FinishStop   = "stop"
	FinishLength = "length"
)

// Done ends a request normally.
type Done struct {
	FinishReason     string
	PromptTokens     uint32
	CompletionTokens uint32
}

// Error codes a worker sends; the gateway maps them to HTTP statuses.
const (
	CodeContextLength  = "context_length_exceeded"
	CodeModelNotFound  = "model_not_found"
	CodeInvalidRequest = "invalid_request"
	CodeInternal       = "internal_error"
	CodeCancelled      = "cancelled"
	// CodeWorkerLost ends a call whose worker process died or whose ring
	// failed. The gateway makes it, never a worker; a request that gets it
	// before any other event never started and may run elsewhere.
	CodeWorkerLost = "worker_lost"
)

// Error ends a request with a failure.
type Error struct {
	Code    string
	Message string
}

// ModelInfo describes one model a worker serves.
type ModelInfo struct {
	Name          string
	ContextLength uint32
}

// Ready is a worker's first frame once its models are loaded.
type Ready struct {
	PID    uint32
	Slots  uint32
	Models []ModelInfo
}

// Stats is a worker's periodic report of cumulative counters. The gateway
// exports them as metrics.
type Stats struct {
	TokensGenerated    uint64
	SequencesStarted   uint64
	SequencesFinished  uint64
	SequencesCancelled uint64
	Active             uint32
}

// ControlOp says what a Control asks of a worker.
type ControlOp uint8

// Control operations.
const (
	// ControlLoad loads the model in Dir under Name beside the models
	// already served, warms it up and, when Dir holds golden.json, checks
	// its answer.
	ControlLoad ControlOp = 1
	// ControlUnload stops admitting requests for Name and closes the model
	// once its running sequences have finished.
	ControlUnload ControlOp = 2

	maxControlOp = ControlUnload
)

// Control is a request to change the models a worker serves. The worker
// answers with Done (FinishReason FinishOK) or Error on the frame's ID.
type Control struct {
	Op   ControlOp
	Name string // the name requests use, "model@version" for versions
	Dir  string // the model directory, for ControlLoad
}

// FinishOK is the FinishReason of a successful control request.
const FinishOK = "ok"
