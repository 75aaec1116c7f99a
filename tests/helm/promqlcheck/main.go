// promqlcheck parses PromQL with Prometheus's own parser, for the chart tests
// (tests/helm/test_chart.py): the Grafana dashboards' queries must be valid PromQL.
//
// stdin: one expression a line, each a JSON string. stdout: a JSON list with, for each,
// {"error": "" or the parser's message, "metrics": the metric names of its vector selectors}.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/prometheus/prometheus/promql/parser"
)

type result struct {
	Error   string   `json:"error"`
	Metrics []string `json:"metrics"`
}

func main() {
	out := []result{}
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var text string
		if err := json.Unmarshal(sc.Bytes(), &text); err != nil {
			fmt.Fprintln(os.Stderr, "promqlcheck: each line must be a JSON string:", err)
			os.Exit(2)
		}
		r := result{Metrics: []string{}}
		expr, err := parser.ParseExpr(text)
		if err != nil {
			r.Error = err.Error()
		} else {
			seen := map[string]bool{}
			parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
				if vs, ok := node.(*parser.VectorSelector); ok && !seen[vs.Name] {
					seen[vs.Name] = true
					r.Metrics = append(r.Metrics, vs.Name)
				}
				return nil
			})
			sort.Strings(r.Metrics)
		}
		out = append(out, r)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "promqlcheck:", err)
		os.Exit(2)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "promqlcheck:", err)
		os.Exit(2)
	}
}
