// Package layering holds only a test: the one that keeps h3infer's import
// graph pointing one way, as ARCHITECTURE.md lays it out.
package layering
