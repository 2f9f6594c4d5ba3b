package gateway

import (
	"fmt"
	"mime"
	"net"
	"net/http"
	"strings"
)

// adminGuard keeps web pages away from the admin listener. A browser on
// the same machine can reach a loopback listener from any page: a "simple"
// cross-origin POST (text/plain body) needs no CORS preflight, and after
// DNS rebinding a page on evil.example reads the answers as its own. So the
// listener answers only to its own names, refuses whatever a browser marks
// as coming from another origin, and takes state changes only as JSON,
// which a cross-origin page can send only after a preflight that nothing
// here ever approves.
type adminGuard struct {
	port string
	// hosts are the Host values accepted as they are (lower case): the
	// configured and the bound address.
	hosts map[string]bool
	// names are extra host names accepted on any port (Config.AdminHosts).
	names map[string]bool
	// anyIP accepts every IP literal on the port: the listener is bound to
	// the unspecified address, so it has no one address to compare with. A
	// rebound name never arrives as an IP literal.
	anyIP bool
	count func(reason string)
}

// ValidateAdminHosts reports every entry of Config.AdminHosts that could
// never match a Host header: names are compared without their port, so
// one written with a port, a path or brackets names nothing. Each is
// reported under key: the name the caller's configuration gives the list
// (the file's top-level admin_hosts, say).
func ValidateAdminHosts(key string, hosts []string) []error {
	var errs []error
	for i, h := range hosts {
		if h == "" || strings.ContainsAny(h, ":/[] ") {
			errs = append(errs, fmt.Errorf("%s[%d]: want a host name without port, got %q", key, i, h))
		}
	}
	return errs
}

func newAdminGuard(configured, bound string, names []string, count func(string)) *adminGuard {
	a := &adminGuard{hosts: map[string]bool{}, names: map[string]bool{}, count: count}
	bhost, bport, _ := net.SplitHostPort(bound)
	a.port = bport
	a.hosts[strings.ToLower(bound)] = true
	if _, cport, err := net.SplitHostPort(configured); err == nil && cport == bport {
		a.hosts[strings.ToLower(configured)] = true
	}
	if ip := net.ParseIP(bhost); ip != nil && ip.IsUnspecified() {
		a.anyIP = true
	}
	for _, n := range names {
		a.names[strings.ToLower(n)] = true
	}
	return a
}

// hostAllowed reports whether the Host header names this listener.
func (a *adminGuard) hostAllowed(hostport string) bool {
	hostport = strings.ToLower(hostport)
	if a.hosts[hostport] {
		return true
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		// No port: HTTP's default.
		host, port = strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), "80"
	}
	if a.names[host] {
		return true
	}
	if port != a.port {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && (ip.IsLoopback() || a.anyIP)
}

// check returns why r must be refused, or nil.
func (a *adminGuard) check(r *http.Request) error {
	probe := r.Method == http.MethodGet && (r.URL.Path == "/healthz" || r.URL.Path == "/readyz")
	// Probes tell nothing a rebinding page could use, and a load balancer
	// may name the listener however it likes.
	if !probe && !a.hostAllowed(r.Host) {
		return &adminMisdirected{host: r.Host}
	}
	if o := r.Header.Get("Origin"); o != "" && !strings.EqualFold(o, "http://"+r.Host) {
		return &adminCrossOrigin{from: "Origin " + o}
	}
	switch s := r.Header.Get("Sec-Fetch-Site"); s {
	case "cross-site", "same-site":
		return &adminCrossOrigin{from: "Sec-Fetch-Site " + s}
	}
	if strings.HasPrefix(r.URL.Path, "/admin/") && r.Method != http.MethodGet && r.Method != http.MethodHead {
		mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
		if err != nil || mt != "application/json" {
			return &unsupportedMediaType{got: r.Header.Get("Content-Type"), want: "application/json"}
		}
	}
	return nil
}

func (a *adminGuard) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := a.check(r); err != nil {
			a.count(adminRefusalReason(err))
			writeError(w, err)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// adminRefusalReason labels h3infer_admin_refusals_total.
func adminRefusalReason(err error) string {
	switch err.(type) {
	case *adminMisdirected:
		return "host"
	case *adminCrossOrigin:
		return "origin"
	case *unsupportedMediaType:
		return "content_type"
	}
	return "token"
}
