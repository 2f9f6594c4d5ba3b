package scheduler

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"h3infer/config"
	"h3infer/priority"
)

// Config tunes the scheduler. It is the configuration file's "scheduler"
// section as it is written, and its zero values mean the documented
// defaults (WithDefaults).
type Config struct {
	// MaxQueue bounds the requests waiting for a slot across all tenants;
	// one more is refused with an *OverloadError. Default 256.
	MaxQueue int `json:"max_queue"`
	// RetryAfter is the advice carried by overload and tenant-limit errors
	// when nothing better is known: with Admission "delay", a refusal for a
	// model whose service rate has been measured advises the predicted
	// drain time of that model's queue instead. Default 1s.
	RetryAfter config.Duration `json:"retry_after"`
	// Admission says what bounds the queue: AdmissionDelay (the default)
	// refuses a request whose predicted wait exceeds MaxQueueDelay and
	// fails queued requests that have waited past QueueDelayTarget while
	// the queue stands above it; AdmissionCount bounds it by MaxQueue
	// alone. MaxQueue applies in both.
	Admission string `json:"admission"`
	// MaxQueueDelay is the longest predicted wait a request is admitted
	// with, under AdmissionDelay. Default 1s.
	MaxQueueDelay config.Duration `json:"max_queue_delay"`
	// QueueDelayTarget is the wait the controlled-delay guard holds the
	// queue to, under AdmissionDelay. Default MaxQueueDelay.
	QueueDelayTarget config.Duration `json:"queue_delay_target"`
	// QueueDelayInterval is how long the oldest queued request's wait must
	// stay above QueueDelayTarget before the guard fails requests that
	// waited past it. Default 500ms.
	QueueDelayInterval config.Duration `json:"queue_delay_interval"`
	// LIFO serves, while the guard is failing requests, the newest request
	// of a tenant and effective urgency first instead of the oldest
	// (adaptive LIFO): under overload the requests still likely to be
	// wanted go first, and the stale ones age out to the guard. Only with
	// AdmissionDelay. Default false: FIFO always.
	LIFO bool `json:"lifo"`
	// Aging is how long a queued request waits before it competes one
	// urgency level higher (see queue for the rule and its bound). Default
	// 2s; a request of urgency 7 thus competes at urgency 0 after 14s.
	Aging config.Duration `json:"aging"`
	// Classes says which urgencies are urgent, normal and bulk; the class
	// Submit derives from it travels with the request to every later stage.
	// The zero value means priority.DefaultClasses. The file writes it at
	// its top level ("priority"), since every stage reads it; the command
	// hands it on.
	Classes priority.Classes `json:"-"`
	// UrgentReserve is how many slots on each worker only urgent requests
	// (by their effective urgency, so aged requests too) may take, so
	// that an urgent request does not wait for a bulk one to finish. Each
	// worker keeps at least one slot for everyone, so a single-slot worker
	// reserves none whatever this says. nil means DefaultUrgentReserve;
	// a pointer, because 0 (no reserve) is a choice of its own.
	UrgentReserve *int `json:"urgent_reserve"`
	// Tenants lists the tenants and their shares. A request naming a tenant
	// not listed here is served as the tenant DefaultTenant, which exists
	// even when not listed (weight 1, default urgency 3, no ceiling, no
	// bound of its own).
	Tenants []Tenant `json:"tenants"`
}

// Tenant is one tenant's share of the scheduler. Built in Go, every field
// is taken as written, a weight of 0 included, which is refused. Read from
// the configuration file (UnmarshalJSON), a weight left out or 0 is
// DefaultWeight and a default_urgency left out is priority.Default.
type Tenant struct {
	Name string `json:"name"`
	// Weight is the tenant's share of service among tenants queued at the
	// same urgency, in tokens asked for. 1..MaxWeight.
	Weight int `json:"weight"`
	// DefaultUrgency applies when a request names none. 0..7.
	DefaultUrgency priority.Urgency `json:"default_urgency"`
	// UrgencyCeiling is the most urgent level the tenant may claim: a
	// request asking for a smaller urgency value gets this one. 0..7, at
	// most DefaultUrgency.
	UrgencyCeiling priority.Urgency `json:"urgency_ceiling"`
	// MaxQueue bounds the tenant's queued requests; one more is refused
	// with a *TenantLimitError. 0: only the global bound applies.
	MaxQueue int `json:"max_queue"`
}

// Defaults for Config's zero values, and the file's for a Tenant.
const (
	DefaultMaxQueue      = 256
	DefaultRetryAfter    = time.Second
	DefaultAging         = 2 * time.Second
	DefaultUrgentReserve = 1
	// DefaultMaxQueueDelay leaves the queue half of the second within
	// which a chat user still reads a first token as the system
	// responding (the classic 1 s limit for an uninterrupted flow of
	// thought); prefill, a backend's own queue and the network take the
	// rest (docs/BENCHMARKS.md, "Scenario 4": at 1 s the admitted TTFT p99
	// under overload was twice that at capacity).
	DefaultMaxQueueDelay = 500 * time.Millisecond
	// DefaultQueueDelayInterval lets a burst that drains on its own pass:
	// the guard acts only on a queue that stays long.
	DefaultQueueDelayInterval = 500 * time.Millisecond
	DefaultTenant             = "default"
	DefaultWeight             = 1
)

// Admission policies (Config.Admission).
const (
	AdmissionDelay = "delay"
	AdmissionCount = "count"
)

// MaxWeight is the largest tenant weight accepted.
const MaxWeight = 1000

// WithDefaults returns c with every zero value replaced by its default.
func (c Config) WithDefaults() Config {
	if c.MaxQueue == 0 {
		c.MaxQueue = DefaultMaxQueue
	}
	if c.RetryAfter == 0 {
		c.RetryAfter = config.Duration(DefaultRetryAfter)
	}
	if c.Aging == 0 {
		c.Aging = config.Duration(DefaultAging)
	}
	if c.Admission == "" {
		c.Admission = AdmissionDelay
	}
	if c.MaxQueueDelay == 0 {
		c.MaxQueueDelay = config.Duration(DefaultMaxQueueDelay)
	}
	if c.QueueDelayTarget == 0 {
		// Above the prediction's bound, so that the guard catches what
		// prediction got wrong rather than the spread of waits it admits
		// (at the bound itself it failed admitted requests after a full
		// wait: docs/BENCHMARKS.md, "Scenario 4").
		c.QueueDelayTarget = c.MaxQueueDelay * 3 / 2
	}
	if c.QueueDelayInterval == 0 {
		c.QueueDelayInterval = config.Duration(DefaultQueueDelayInterval)
	}
	c.Classes = c.Classes.OrDefault()
	if c.UrgentReserve == nil {
		c.UrgentReserve = new(DefaultUrgentReserve)
	}
	return c
}

// Validate reports every problem with c at once, each naming its key as
// the configuration file writes it: "scheduler.max_queue: must be > 0,
// got -1". Zero values stand for their defaults. The reserve's upper bound
// depends on the backends' slots, which the scheduler learns only from the
// backends themselves; whoever knows them checks it (cmd/h3infer does,
// against workers.slots).
func (c Config) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if c.MaxQueue < 1 {
		errs = append(errs, fmt.Errorf("scheduler.max_queue: must be > 0, got %d", c.MaxQueue))
	}
	if c.RetryAfter < 0 {
		errs = append(errs, fmt.Errorf("scheduler.retry_after: must be positive, got %s", c.RetryAfter))
	}
	if c.Aging < 0 {
		errs = append(errs, fmt.Errorf("scheduler.aging: must be positive, got %s", c.Aging))
	}
	if c.Admission != AdmissionDelay && c.Admission != AdmissionCount {
		errs = append(errs, fmt.Errorf("scheduler.admission: must be %q or %q, got %q", AdmissionDelay, AdmissionCount, c.Admission))
	}
	if c.LIFO && c.Admission != AdmissionDelay {
		errs = append(errs, fmt.Errorf("scheduler.lifo: needs scheduler.admission %q, got %q", AdmissionDelay, c.Admission))
	}
	if c.MaxQueueDelay < 0 {
		errs = append(errs, fmt.Errorf("scheduler.max_queue_delay: must be positive, got %s", c.MaxQueueDelay))
	}
	if c.QueueDelayTarget < 0 {
		errs = append(errs, fmt.Errorf("scheduler.queue_delay_target: must be positive, got %s", c.QueueDelayTarget))
	}
	if c.QueueDelayInterval < 0 {
		errs = append(errs, fmt.Errorf("scheduler.queue_delay_interval: must be positive, got %s", c.QueueDelayInterval))
	}
	errs = append(errs, c.Classes.Validate("priority")...)
	if r := *c.UrgentReserve; r < 0 {
		errs = append(errs, fmt.Errorf("scheduler.urgent_reserve: must be >= 0, got %d", r))
	}
	_, terrs := tenantTable(c.Tenants)
	errs = append(errs, terrs...)
	return errors.Join(errs...)
}

// UnmarshalJSON reads a tenant as the configuration file writes it: a
// weight left out or 0 is DefaultWeight, and a default_urgency left out is
// priority.Default, while one written as 0 is 0, the most urgent. Unknown
// keys are refused, as everywhere in the file.
func (t *Tenant) UnmarshalJSON(b []byte) error {
	type fields Tenant // Tenant without this method
	f := fields{DefaultUrgency: priority.Default}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return err
	}
	if f.Weight == 0 {
		f.Weight = DefaultWeight
	}
	*t = Tenant(f)
	return nil
}

// tenantTable checks a tenant list and indexes it by name, with
// DefaultTenant present even when not listed.
func tenantTable(list []Tenant) (map[string]Tenant, []error) {
	var errs []error
	tenants := map[string]Tenant{
		DefaultTenant: {Name: DefaultTenant, Weight: DefaultWeight, DefaultUrgency: priority.Default},
	}
	listed := map[string]bool{}
	for i, t := range list {
		key := fmt.Sprintf("scheduler.tenants[%d]", i)
		switch {
		case t.Name == "":
			errs = append(errs, fmt.Errorf("%s.name: must not be empty", key))
		case listed[t.Name]:
			errs = append(errs, fmt.Errorf("%s.name: %q is listed twice", key, t.Name))
		}
		listed[t.Name] = true
		if t.Weight < 1 || t.Weight > MaxWeight {
			errs = append(errs, fmt.Errorf("%s.weight: must be 1..%d, got %d", key, MaxWeight, t.Weight))
		}
		if !t.DefaultUrgency.Valid() {
			errs = append(errs, fmt.Errorf("%s.default_urgency: must be 0..7, got %d", key, t.DefaultUrgency))
		}
		if !t.UrgencyCeiling.Valid() || t.UrgencyCeiling > t.DefaultUrgency {
			errs = append(errs, fmt.Errorf("%s.urgency_ceiling: must be 0..default_urgency (%d), got %d", key, t.DefaultUrgency, t.UrgencyCeiling))
		}
		if t.MaxQueue < 0 {
			errs = append(errs, fmt.Errorf("%s.max_queue: must be >= 0, got %d", key, t.MaxQueue))
		}
		tenants[t.Name] = t
	}
	return tenants, errs
}
