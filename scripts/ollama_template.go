// Renders an Ollama Modelfile TEMPLATE the way Ollama renders a chat request
// (its template/template.go: `.System` holds the system messages joined by a blank
// line, `.Messages` the messages with consecutive ones of the same role merged),
// for scripts/check_gguf_llamacpp.py, which compares the result with the model's
// Jinja chat template. Input on stdin: {"template": "...", "messages": [{"role",
// "content"}]}; the rendered prompt on stdout.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "input:", err)
		os.Exit(2)
	}
	var system []string
	var msgs []*message
	for i := range in.Messages {
		m := &in.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role {
			msgs[n-1].Content += "\n\n" + m.Content
		} else {
			msgs = append(msgs, m)
		}
	}
	t, err := template.New("").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(1)
	}
	err = t.Execute(os.Stdout, map[string]any{
		"System":   strings.Join(system, "\n\n"),
		"Messages": msgs,
		"Response": "",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
}
