package main

import (
	"os/exec"
	"strings"
	"testing"

	"h3infer/tlsbind"
)

func TestTokenIssueCommand(t *testing.T) {
	bin := buildBinary(t)
	state := t.TempDir()
	out, err := exec.Command(bin, "token", "issue", "--state-dir", state, "--tenant", "acme", "--models", "demo", "--bind", "required", "--urgency-ceiling", "2").Output()
	if err != nil {
		t.Fatalf("token issue: %v", err)
	}
	cred := strings.TrimSpace(string(out))
	if strings.Count(string(out), "\n") != 1 {
		t.Errorf("stdout %q: want the credential alone on one line", out)
	}
	bearer, _, err := tlsbind.SplitCredential(cred)
	if err != nil {
		t.Fatal(err)
	}
	ring, err := tlsbind.LoadKeyRing(state + "/tokens/keys.json")
	if err != nil {
		t.Fatal(err)
	}
	v, _ := tlsbind.NewVerifier(ring, "")
	tok, err := v.Verify(bearer)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Tenant != "acme" || tok.Bind != tlsbind.BindRequired || !tok.AllowsModel("demo") || tok.AllowsModel("other") || tok.CapUrgency(0) != 2 {
		t.Errorf("claims %+v", tok.Claims)
	}
	cmd := exec.Command(bin, "token", "issue", "--state-dir", state, "--ttl", "-1s", "--bind", "sometimes")
	b, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(b), "--tenant") || !strings.Contains(string(b), "--bind") {
		t.Errorf("bad flags: %v\n%s\nwant exit 2 naming --tenant and --bind", err, b)
	}
}
