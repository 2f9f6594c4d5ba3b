package tlsbind

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"h3infer/config"

	"github.com/prometheus/client_golang/prometheus"
)

// ticketExtraPrefix marks our entry in tls.SessionState.Extra; quic-go and
// http3 add entries of their own beside it.
const ticketExtraPrefix = "h3infer ticket v1\x00"

// DefaultMaxEarlyAge is how old a ticket may be and still carry 0-RTT. It
// is hours, not seconds: proofs and the strike register stop replays; the
// age bound limits how long a stolen ticket is worth anything.
const DefaultMaxEarlyAge = 24 * time.Hour

// TicketConfig configures Tickets. The fields with json tags are the
// configuration file's zero_rtt keys of those names, and zero values
// mean the documented defaults (WithDefaults).
type TicketConfig struct {
	// Instance names this gateway in the tickets it issues; tickets
	// naming another instance resume but carry no 0-RTT. At most 255
	// bytes. Default: a random name made by NewTickets, so that 0-RTT is
	// only accepted on tickets this Tickets issued, whose use its register
	// has seen (none from another process sharing the ticket keys, none
	// from before a restart). A name shared with other instances, or
	// listed in their Trusted, is safe only when they all use one durable
	// Strikes.
	Instance string `json:"instance"`
	// Trusted lists the instances whose tickets may carry 0-RTT here;
	// Instance is always trusted. Each name is 1..255 bytes.
	Trusted []string `json:"trusted_instances"`
	// MaxEarlyAge bounds a ticket's age for 0-RTT. Default
	// DefaultMaxEarlyAge.
	MaxEarlyAge config.Duration `json:"max_ticket_age"`
	// Strikes records tickets used once for 0-RTT. Required.
	Strikes StrikeRegister `json:"-"`
	// Window is the freshness window: with a register that is not durable,
	// all 0-RTT is declined for WarmUp(Window) after start-up. The same
	// window the ReplayGuard checks proofs within; MinWindow..MaxWindow,
	// default DefaultWindow.
	Window config.Duration `json:"window"`
	// Registerer receives h3infer_session_tickets_total. Optional.
	Registerer prometheus.Registerer `json:"-"`
}

// maxInstanceName is the longest instance name: a ticket carries it after
// a one-byte length.
const maxInstanceName = 255

// WithDefaults returns c with every zero value replaced by its default;
// Instance stays empty, for NewTickets to make a name of its own.
func (c TicketConfig) WithDefaults() TicketConfig {
	if c.MaxEarlyAge == 0 {
		c.MaxEarlyAge = config.Duration(DefaultMaxEarlyAge)
	}
	if c.Window == 0 {
		c.Window = config.Duration(DefaultWindow)
	}
	return c
}

// Validate reports every problem with c's settings at once, each naming
// its key as the configuration file writes it. Zero values stand for
// their defaults. NewTickets checks the wiring besides.
func (c TicketConfig) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if len(c.Instance) > maxInstanceName {
		errs = append(errs, fmt.Errorf("zero_rtt.instance: must be at most %d bytes, got %d", maxInstanceName, len(c.Instance)))
	}
	for i, name := range c.Trusted {
		if name == "" || len(name) > maxInstanceName {
			errs = append(errs, fmt.Errorf("zero_rtt.trusted_instances[%d]: must be 1..%d bytes, got %q", i, maxInstanceName, name))
		}
	}
	if c.MaxEarlyAge < 0 {
		errs = append(errs, fmt.Errorf("zero_rtt.max_ticket_age: must be positive, got %s", c.MaxEarlyAge))
	}
	if err := checkWindow(time.Duration(c.Window)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Tickets makes 0-RTT session tickets single-use and bounded in age and
// origin. Install it into the server's tls.Config.
type Tickets struct {
	cfg     TicketConfig
	log     *slog.Logger
	started time.Time
	now     func() time.Time
	outcome *prometheus.CounterVec
}

// Outcomes counted by h3infer_session_tickets_total.
const (
	TicketEarlyAllowed   = "early_allowed"
	TicketForeign        = "declined_foreign_instance"
	TicketTooOld         = "declined_too_old"
	TicketReused         = "declined_reused"
	TicketWarmingUp      = "declined_warming_up"
	TicketNoEarlyData    = "resumed_without_early_data"
	TicketUnmarked       = "declined_unmarked"
	TicketRegisterFailed = "declined_register_error"
)

// NewTickets validates cfg.
func NewTickets(cfg TicketConfig, log *slog.Logger) (*Tickets, error) {
	errs := []error{cfg.Validate()}
	if cfg.Strikes == nil {
		errs = append(errs, errors.New("tickets: strike register is nil"))
	}
	if log == nil {
		errs = append(errs, errors.New("tickets: logger is nil"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	cfg = cfg.WithDefaults()
	if cfg.Instance == "" {
		var id [8]byte
		if _, err := rand.Read(id[:]); err != nil {
			return nil, fmt.Errorf("tickets: instance name: %w", err)
		}
		cfg.Instance = "h3infer-" + hex.EncodeToString(id[:])
	}
	t := &Tickets{cfg: cfg, log: log, started: time.Now(), now: time.Now,
		outcome: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "h3infer_session_tickets_total",
			Help: "Session tickets presented for resumption, by what was decided about 0-RTT.",
		}, []string{"outcome"}),
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(t.outcome); err != nil {
			return nil, fmt.Errorf("tickets: register metrics: %w", err)
		}
	}
	return t, nil
}

// Instance is the name this gateway writes into its tickets.
func (t *Tickets) Instance() string { return t.cfg.Instance }

// Install sets c's WrapSession and UnwrapSession. It uses c's own ticket
// keys (tls.Config.SetSessionTicketKeys) for the encryption, so set those
// first; the hooks survive c.Clone.
func (t *Tickets) Install(c *tls.Config) {
	c.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		var id [16]byte
		if _, err := rand.Read(id[:]); err != nil {
			return nil, err
		}
		ss.Extra = append(ss.Extra, t.mark(id, t.now()))
		return c.EncryptTicket(cs, ss)
	}
	c.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := c.DecryptTicket(identity, cs)
		if err != nil || ss == nil {
			return ss, err
		}
		if !ss.EarlyData {
			t.outcome.WithLabelValues(TicketNoEarlyData).Inc()
			return ss, nil
		}
		outcome := t.decide(ss.Extra)
		t.outcome.WithLabelValues(outcome).Inc()
		// Declining 0-RTT still resumes: the client saves a round trip's
		// worth of certificate work and retries its early requests.
		ss.EarlyData = outcome == TicketEarlyAllowed
		return ss, nil
	}
}

// mark is our Extra entry: prefix, instance length and name, issue time in
// unix seconds, ticket id.
func (t *Tickets) mark(id [16]byte, now time.Time) []byte {
	b := []byte(ticketExtraPrefix)
	b = append(b, byte(len(t.cfg.Instance)))
	b = append(b, t.cfg.Instance...)
	b = binary.BigEndian.AppendUint64(b, uint64(now.Unix()))
	return append(b, id[:]...)
}

// ticketMark is a parsed Extra entry.
type ticketMark struct {
	instance string
	issued   time.Time
	id       [16]byte
}

func parseMark(extra [][]byte) (ticketMark, bool) {
	var m ticketMark
	for _, e := range extra {
		rest, ok := bytes.CutPrefix(e, []byte(ticketExtraPrefix))
		if !ok || len(rest) < 1 {
			continue
		}
		n := int(rest[0])
		rest = rest[1:]
		if len(rest) != n+8+16 {
			return m, false
		}
		m.instance = string(rest[:n])
		m.issued = time.Unix(int64(binary.BigEndian.Uint64(rest[n:n+8])), 0)
		copy(m.id[:], rest[n+8:])
		return m, true
	}
	return m, false
}

// decide says whether a ticket that permits early data may use it now.
func (t *Tickets) decide(extra [][]byte) string {
	now := t.now()
	m, ok := parseMark(extra)
	switch {
	case !ok:
		return TicketUnmarked
	case m.instance != t.cfg.Instance && !slices.Contains(t.cfg.Trusted, m.instance):
		return TicketForeign
	case now.Sub(m.issued) > time.Duration(t.cfg.MaxEarlyAge):
		return TicketTooOld
	case !t.cfg.Strikes.Durable() && now.Sub(t.started) < WarmUp(time.Duration(t.cfg.Window)):
		// What the register remembered died with the last process
		// (RFC 8446 section 8): a ticket used before the restart could be
		// used again now, with an early proof made for that use still
		// fresh.
		return TicketWarmingUp
	}
	// Tickets live far longer than the window; remember them as long as
	// they may carry 0-RTT.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	first, err := t.cfg.Strikes.Strike(ctx, "ticket:"+hex.EncodeToString(m.id[:]), time.Duration(t.cfg.MaxEarlyAge))
	if err != nil {
		t.log.Warn("declining 0-RTT: strike register failed", "err", err)
		return TicketRegisterFailed
	}
	if !first {
		return TicketReused
	}
	return TicketEarlyAllowed
}
