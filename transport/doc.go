// Package transport carries inference traffic between the gateway and its
// worker processes: a pair of single-producer single-consumer byte rings in
// one shared-memory segment (a memfd), futex doorbells, the frame encoding,
// and the gateway-side and worker-side endpoints.
//
// It knows nothing about HTTP or ONNX Runtime.
package transport
