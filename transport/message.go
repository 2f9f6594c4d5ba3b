package transport

import "h3infer/infer"

// The messages below are the payloads of frames that only the ring between
// the gateway and its workers carries; the requests and events it carries
// for every backend are infer's. Their binary encoding lives in frame.go;
// every decoder is fuzzed.

// Ready is a worker's first frame once its models are loaded.
type Ready struct {
	PID   uint32
	Slots uint32
	// SlotsFit is, when the worker derived Slots from its KV budget
	// (workers.slots 0), how many sequences at their model's full context
	// the budget holds, before workerconf.AutoSlots bounded it; 0 when
	// Slots was configured.
	SlotsFit uint32
	Models   []infer.ModelInfo
}

// Stats is a worker's periodic report of cumulative counters. The gateway
// exports them as metrics.
type Stats struct {
	TokensGenerated    uint64
	SequencesStarted   uint64
	SequencesFinished  uint64
	SequencesCancelled uint64
	Active             uint32
	// Prefills counts the prompts the worker ran through its models and
	// PrefillTokens their tokens: a request with several choices counts
	// once, as it is prefilled once.
	Prefills      uint64
	PrefillTokens uint64
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
// answers with infer.Done (FinishReason FinishOK) or infer.Error on the frame's ID.
type Control struct {
	Op   ControlOp
	Name string // the name requests use, "model@version" for versions
	Dir  string // the model directory, for ControlLoad
}

// FinishOK is the FinishReason of a successful control request.
const FinishOK = "ok"
