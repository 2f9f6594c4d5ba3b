// Command h3infer is the QUIC/HTTP3 edge inference gateway: it serves the
// OpenAI-compatible API, runs the worker processes, issues development
// certificates, writes the demo model and talks to a gateway as a client.
//
// Only this package reads flags and the environment and wires the other
// packages together.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

const usage = `h3infer: a QUIC/HTTP3 edge inference gateway

Usage:
  h3infer serve    [--config FILE] [--listen ADDR] [--admin ADDR] [--state-dir DIR] [--workers N]
  h3infer chat     [--url URL] [--ca FILE] [--state-dir DIR] [--token CRED] [--model NAME] [--session-cache FILE|off] ["prompt"]  (no prompt: a conversation on stdin)
  h3infer bench    [--url URL] [--proto h3|h2|h1] [--concurrency N,N..] [--rate R] [--requests N] [--duration D]
                   [--baseline-url URL] [--new-conn] [--0rtt] [--json FILE] [--plot PREFIX]
  h3infer bench    --bare-listen ADDR   (the comparison server)
  h3infer token    issue --tenant NAME [--state-dir DIR] [--models a,b] [--ttl 24h] [--bind optional|required] [--urgency-ceiling N]
  h3infer token    rotate [--state-dir DIR] [--keep 720h]
  h3infer certs init [--state-dir DIR] [--name NAME]... [--force]
  h3infer models   [--admin ADDR] list | load|unload|promote MODEL VERSION | canary MODEL VERSION PERCENT | rollback MODEL
  h3infer genmodel --out DIR [--layers N --heads N --hidden N --context N --random --seed N]
  h3infer worker   (started by serve, never by hand)

Run "h3infer COMMAND -h" for the flags of one command.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: logLevel()}))

	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "serve":
		err = runServe(ctx, rest, stdout, log)
	case "worker":
		err = runWorker(ctx, rest, log)
	case "bench":
		err = runBench(ctx, rest, stdout, stderr, log)
	case "chat":
		err = runChat(ctx, rest, os.Stdin, stdout, stderr, log)
	case "certs":
		err = runCerts(rest, stdout)
	case "token":
		err = runToken(rest, stdout)
	case "genmodel":
		err = runGenmodel(rest, stdout)
	case "models":
		err = runModels(ctx, rest, stdout)
	case "netemu":
		err = runNetemu(ctx, rest, stdout, log)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "h3infer: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "h3infer %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "h3infer %s: %v\n", args[0], err)
		return 1
	}
}

// usageError marks a mistake on the command line (exit status 2).
type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// logLevel reads H3INFER_LOG_LEVEL (debug, info, warn, error); info by default.
func logLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("H3INFER_LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return l
}

// parseFlags parses args, turning a stray positional argument into a usage error.
func parseFlags(fs *flag.FlagSet, args []string, positional int) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fs.PrintDefaults()
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > positional {
		return usagef("unexpected argument %q", fs.Arg(positional))
	}
	return nil
}
