package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

const modelsUsage = `h3infer models [--admin ADDR] list
h3infer models [--admin ADDR] load|unload|promote MODEL VERSION
h3infer models [--admin ADDR] canary MODEL VERSION PERCENT   (PERCENT 0 ends the canary)
h3infer models [--admin ADDR] rollback MODEL`

// runModels drives the admin API of a running gateway's model repository.
func runModels(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("models", flag.ContinueOnError)
	admin := fs.String("admin", "127.0.0.1:9090", "host:port of the gateway's admin listener")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long to wait for a load to finish")
	adminTok := fs.String("admin-token", "", "the gateway's admin token, when it has one (default $H3INFER_ADMIN_TOKEN, else the one serve generated in DIR/tokens/admin.token)")
	stateDir := fs.String("state-dir", ".h3infer", "the gateway's state directory, where serve keeps a generated admin token")
	fs.Usage = func() { fmt.Fprintln(fs.Output(), modelsUsage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		return err
	}
	a := fs.Args()
	if len(a) == 0 {
		return usageError{fmt.Errorf("want a verb:\n%s", modelsUsage)}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	base := "http://" + *admin + "/admin/models"
	var (
		req *http.Request
		err error
	)
	need := func(n int) error {
		if len(a) != n {
			return usageError{fmt.Errorf("%s: want %d arguments, got %d:\n%s", a[0], n-1, len(a)-1, modelsUsage)}
		}
		return nil
	}
	switch a[0] {
	case "list":
		if err := need(1); err != nil {
			return err
		}
		req, err = http.NewRequestWithContext(ctx, http.MethodGet, base, nil)
	case "load", "unload", "promote", "canary", "rollback":
		body := map[string]any{"action": a[0]}
		switch a[0] {
		case "rollback":
			err = need(2)
		case "canary":
			if err = need(4); err == nil {
				body["version"] = a[2]
				var pct float64
				if pct, err = strconv.ParseFloat(a[3], 64); err != nil {
					return usageError{fmt.Errorf("canary: percent: %w", err)}
				}
				body["percent"] = pct
			}
		default:
			if err = need(3); err == nil {
				body["version"] = a[2]
			}
		}
		if err != nil {
			return err
		}
		b, _ := json.Marshal(body)
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, base+"/"+a[1], bytes.NewReader(b))
		if err == nil {
			// The admin listener takes state changes only as JSON.
			req.Header.Set("Content-Type", "application/json")
		}
	default:
		return usageError{fmt.Errorf("unknown verb %q:\n%s", a[0], modelsUsage)}
	}
	if err != nil {
		return err
	}
	if *adminTok == "" {
		*adminTok = os.Getenv("H3INFER_ADMIN_TOKEN")
	}
	if *adminTok == "" {
		// Present only when serve generated it for a non-loopback listener.
		if b, err := os.ReadFile(adminTokenFile(*stateDir)); err == nil {
			*adminTok = strings.TrimSpace(string(b))
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("admin token: %w", err)
		}
	}
	if *adminTok != "" {
		req.Header.Set("Authorization", "Bearer "+*adminTok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("admin API: %w", err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("admin API: read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		// Model admin errors are {"error": message}; the listener's own
		// refusals are the API's {"error": {"message": ...}}.
		var e struct{ Error json.RawMessage }
		if json.Unmarshal(out, &e) == nil && len(e.Error) > 0 {
			var msg string
			var obj struct{ Message string }
			if json.Unmarshal(e.Error, &msg) == nil && msg != "" {
				return fmt.Errorf("%s (HTTP %d)", msg, resp.StatusCode)
			}
			if json.Unmarshal(e.Error, &obj) == nil && obj.Message != "" {
				return fmt.Errorf("%s (HTTP %d)", obj.Message, resp.StatusCode)
			}
		}
		return fmt.Errorf("admin API: HTTP %d: %s", resp.StatusCode, out)
	}
	_, err = stdout.Write(out)
	return err
}
