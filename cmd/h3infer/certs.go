package main

import (
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"h3infer/certs"
)

// nameList collects a repeated --name flag.
type nameList []string

func (n *nameList) String() string     { return strings.Join(*n, ",") }
func (n *nameList) Set(v string) error { *n = append(*n, v); return nil }

func runCerts(args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] != "init" {
		return usagef("usage: h3infer certs init [--state-dir DIR] [--name NAME]... [--force]")
	}
	fs := flag.NewFlagSet("certs init", flag.ContinueOnError)
	stateDir := fs.String("state-dir", ".h3infer", "state directory; certificates go to DIR/certs")
	force := fs.Bool("force", false, "replace an existing CA and leaf")
	var names nameList
	fs.Var(&names, "name", "extra DNS name or IP address for the leaf (repeatable)")
	if err := parseFlags(fs, args[1:], 0); err != nil {
		return err
	}
	dev, err := certs.EnsureDev(filepath.Join(*stateDir, "certs"), certs.DevOptions{Names: names, Force: *force})
	if err != nil {
		return err
	}
	verb := "kept the existing"
	if dev.Created {
		verb = "wrote a new"
	}
	fmt.Fprintf(stdout, "h3infer certs: %s development CA and leaf in %s\n", verb, dev.Dir)
	fmt.Fprintf(stdout, "  CA:    %s\n  leaf:  %s\n  key:   %s\n  SPKI:  %s\n", dev.CAFile, dev.CertFile, dev.KeyFile, dev.SPKI)
	fmt.Fprintf(stdout, "Trust the CA per client (curl --cacert %s, h3infer chat --ca %s),\n", dev.CAFile, dev.CAFile)
	fmt.Fprintf(stdout, "or pin the leaf in Chromium: --ignore-certificate-errors-spki-list=%s\n", dev.SPKI)
	return nil
}
