// Package web holds the chat page the gateway serves at "/": plain HTML, CSS
// and JavaScript embedded in the binary, with no build step and no framework.
// The page speaks to the gateway only through the public OpenAI API, so this
// package imports nothing else of h3infer.
package web

import (
	"embed"
	"io/fs"
)

//go:embed index.html chat.css chat.js favicon.svg
var files embed.FS

// Index is the page's entry point within FS.
const Index = "index.html"

// FS returns the page's files: index.html and the assets it names by their
// base names (chat.css, chat.js, favicon.svg), which the server serves beside "/".
func FS() fs.FS { return files }
