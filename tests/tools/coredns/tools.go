//go:build tools

// Package tools pins CoreDNS, which serves cluster.local to the test nodes' pods.
package tools

import (
	_ "github.com/coredns/coredns"
)
