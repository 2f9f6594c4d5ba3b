package gateway

// A request's goroutine is new (quic-go and net/http start one per
// stream or connection) and starts with a small stack, which the request
// then outgrows deep inside decoding its JSON body and starting its trace
// span. Each growth copies the stack and rewrites the pointers of every
// frame on it, and deep in encoding/json's recursion that is many frames:
// a profile at 256 concurrent streams put 6% of the gateway's CPU in
// runtime.newstack. Growing the stack once, at the top of the handler
// while it is a few frames deep, costs a fraction of that, and the later
// growths never happen (BenchmarkRequestStack: 28-33 µs a request as it
// was, 14-15 µs grown first). The runtime shrinks a stack again at a GC
// if it stays mostly unused.

// requestStack is how much stack the handler grows by. A request's
// goroutine ends up with a 16 KiB stack either way: 12 KiB on top of the
// handler's first frames rounds up to it, where 16 KiB would double it
// (Prometheus' go_memstats_stack_inuse_bytes over 400 running streams:
// 17.4-17.9 KB a stream as it was and with 12 KiB, 23.8 KB with 16 KiB).
const requestStack = 12 << 10

// growStack makes the calling goroutine's stack hold requestStack bytes
// more than it uses now.
//
//go:noinline
func growStack() {
	var frame [requestStack]byte
	touchStack(frame[:])
}

// touchStack uses b so that the compiler keeps the frame that holds it.
//
//go:noinline
func touchStack(b []byte) { b[len(b)-1] = 0 }
