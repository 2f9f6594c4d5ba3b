package scheduler

import (
	"errors"
	"fmt"
	"time"
)

// Errors callers branch on. The gateway turns them into HTTP statuses.
var (
	// ErrOverloaded means the queue was full. The concrete error is an
	// *OverloadError carrying the retry advice.
	ErrOverloaded = errors.New("scheduler: overloaded")
	// ErrClosed means the scheduler was closed before the request ran.
	ErrClosed = errors.New("scheduler: closed")
	// ErrDeadline means the request's deadline passed before a worker slot
	// became free.
	ErrDeadline = errors.New("scheduler: deadline passed before dispatch")
)

// OverloadError is returned by Submit when the scheduler refuses a
// request for want of capacity, for the Reason given. It matches
// ErrOverloaded with errors.Is.
type OverloadError struct {
	RetryAfter time.Duration // how long the client should wait before trying again
	Queued     int           // requests waiting when this one was refused
	// Reason is one of the Reason constants; "" reads as ReasonQueueFull.
	Reason string
}

// Why an OverloadError refused a request.
const (
	// ReasonQueueFull: scheduler.max_queue requests were waiting.
	ReasonQueueFull = "queue_full"
	// ReasonPredictedDelay: the request's predicted wait exceeded
	// scheduler.max_queue_delay, so it was refused on arrival.
	ReasonPredictedDelay = "predicted_delay"
	// ReasonQueueDelay: the request waited past
	// scheduler.queue_delay_target while the queue stood above it, and the
	// controlled-delay guard failed it rather than serve it late.
	ReasonQueueDelay = "queue_delay"
)

func (e *OverloadError) Error() string {
	reason := e.Reason
	if reason == "" {
		reason = ReasonQueueFull
	}
	return fmt.Sprintf("scheduler: overloaded (%s): %d requests queued, retry after %s", reason, e.Queued, e.RetryAfter)
}

// Is makes errors.Is(err, ErrOverloaded) true.
func (e *OverloadError) Is(target error) bool { return target == ErrOverloaded }

// ErrTenantLimit means the request's tenant already had as many requests
// queued as its bound allows. The concrete error is a *TenantLimitError.
var ErrTenantLimit = errors.New("scheduler: tenant queue limit")

// TenantLimitError is returned by Submit when the tenant's own queue bound
// is reached while others may still queue. It matches ErrTenantLimit.
type TenantLimitError struct {
	Tenant     string
	RetryAfter time.Duration
	Queued     int // the tenant's requests waiting when this one was refused
}

func (e *TenantLimitError) Error() string {
	return fmt.Sprintf("scheduler: tenant %q has %d requests queued, its bound; retry after %s", e.Tenant, e.Queued, e.RetryAfter)
}

// Is makes errors.Is(err, ErrTenantLimit) true.
func (e *TenantLimitError) Is(target error) bool { return target == ErrTenantLimit }
