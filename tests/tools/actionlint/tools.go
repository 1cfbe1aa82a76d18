//go:build tools

// Package tools pins actionlint, which lints .github/workflows in the test command.
package tools

import _ "github.com/rhysd/actionlint/cmd/actionlint"
