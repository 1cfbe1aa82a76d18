// Command dkron-standin stands in for a Dkron v4.1.2 server agent in dkron-ha's CI: the
// behaviour dkron-ha depends on, on the libraries Dkron pins (raft, serf, memberlist, gRPC,
// raft-boltdb, cobra, viper), each mirrored piece commented with where it was read in Dkron's
// source ("Dkron v4.1.2 FILE") or observed (ARCHITECTURE.md "Dkron facts"). A test fixture, never
// shipped; it holds no Dkron code. Jobs are stored, and run only when asked (run.go).
package main

import (
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// The serf "version" tag (Dkron v4.1.2 dkron/version.go: set at build time).
const version = "4.1.2-standin"

// Config holds the settings Dkron v4.1.2 dkron/config.go keeps, under the same mapstructure
// keys (flag names), so viper fills it as it fills Dkron's. Settings Dkron has only for
// features the stand-in lacks (mail, webhooks, metrics, UI, plugins) are accepted as flags
// and ignored.
type Config struct {
	NodeName             string            `mapstructure:"node-name"`
	BindAddr             string            `mapstructure:"bind-addr"`
	HTTPAddr             string            `mapstructure:"http-addr"`
	Profile              string            `mapstructure:"profile"`
	AdvertiseAddr        string            `mapstructure:"advertise-addr"`
	Tags                 map[string]string `mapstructure:"tags"`
	Server               bool              `mapstructure:"server"`
	EncryptKey           string            `mapstructure:"encrypt"`
	StartJoin            []string          `mapstructure:"join"`
	RetryJoin            []string          `mapstructure:"retry-join"`
	RetryMaxAttempts     int               `mapstructure:"retry-max"`
	RetryInterval        time.Duration     `mapstructure:"retry-interval"`
	RPCPort              int               `mapstructure:"rpc-port"`
	AdvertiseRPCPort     int               `mapstructure:"advertise-rpc-port"`
	LogLevel             string            `mapstructure:"log-level"`
	Datacenter           string            `mapstructure:"datacenter"`
	Region               string            `mapstructure:"region"`
	Bootstrap            bool              `mapstructure:"bootstrap"`
	BootstrapExpect      int               `mapstructure:"bootstrap-expect"`
	DataDir              string            `mapstructure:"data-dir"`
	ReconcileInterval    time.Duration     `mapstructure:"reconcileinterval"`
	RaftMultiplier       int               `mapstructure:"raft-multiplier"`
	SerfReconnectTimeout string            `mapstructure:"serf-reconnect-timeout"`
}

// defaultConfig: Dkron v4.1.2 dkron/config.go DefaultConfig (node name = hostname, bind
// "{{ GetPrivateIP }}:8946", HTTP ":8080", RPC 6868, data dir "dkron.data", dc1/global,
// reconcile every 60 s, raft multiplier 1, serf reconnect timeout 24h).
func defaultConfig() *Config {
	host, err := os.Hostname()
	if err != nil {
		log.Panic(err)
	}
	return &Config{NodeName: host, BindAddr: "{{ GetPrivateIP }}:8946", HTTPAddr: ":8080",
		Profile: "lan", LogLevel: "info", RPCPort: 6868, Tags: map[string]string{},
		DataDir: "dkron.data", Datacenter: "dc1", Region: "global",
		ReconcileInterval: 60 * time.Second, RaftMultiplier: 1, SerfReconnectTimeout: "24h",
		RetryInterval: 30 * time.Second}
}

// agentFlags: the flag set of Dkron v4.1.2 dkron/config.go ConfigFlagSet, same names, types
// and defaults (`--retry-interval` is a string there, "30s"; `--retry-join`, `--join`, `--tag`
// are string slices: repeatable and comma-separated).
func agentFlags(fs *pflag.FlagSet) {
	c := defaultConfig()
	fs.Bool("server", false, "This node is running in server mode")
	fs.String("node-name", c.NodeName, "Name of this node. Must be unique in the cluster")
	fs.String("bind-addr", c.BindAddr, "Address to bind network services to (go-sockaddr template)")
	fs.String("advertise-addr", "", "Address to advertise to other nodes (go-sockaddr template)")
	fs.String("http-addr", c.HTTPAddr, "Address to bind the HTTP API to")
	fs.String("profile", c.Profile, "Serf timing profile (lan, wan, local)")
	fs.StringSlice("join", []string{}, "An initial agent to join with")
	fs.StringSlice("retry-join", []string{}, "Address of an agent to join at start time with retries")
	fs.Int("retry-max", 0, "Maximum number of join attempts (0: no limit)")
	fs.String("retry-interval", "30s", "Time to wait between join attempts")
	fs.Int("raft-multiplier", c.RaftMultiplier, "Multiplier of the raft timing parameters (1-10)")
	fs.StringSlice("tag", []string{}, "Tag key=value, repeatable")
	fs.String("encrypt", "", "Base64 key encrypting serf traffic")
	fs.String("log-level", c.LogLevel, "Log level (debug|info|warn|error|fatal|panic)")
	fs.Int("rpc-port", c.RPCPort, "gRPC + raft port")
	fs.Int("advertise-rpc-port", 0, "Use the value of rpc-port by default")
	fs.Int("bootstrap-expect", 0, "Number of servers to wait for before bootstrapping raft")
	fs.String("data-dir", c.DataDir, "Directory of the raft log and snapshots")
	fs.String("datacenter", c.Datacenter, "Datacenter of the agent")
	fs.String("region", c.Region, "Region of the agent")
	fs.String("serf-reconnect-timeout", c.SerfReconnectTimeout, "Time to try reconnecting to a failed node")
	fs.Bool("ui", true, "Accepted, ignored (no UI)")
	// Accepted and ignored: the stand-in has no notifications, metrics, tracing or plugins.
	for _, name := range []string{"mail-host", "mail-username", "mail-password", "mail-from",
		"mail-payload", "pre-webhook-endpoint", "pre-webhook-payload", "webhook-endpoint",
		"webhook-url", "webhook-payload", "cronitor-endpoint", "dog-statsd-addr", "statsd-addr",
		"otel-endpoint"} {
		fs.String(name, "", "Accepted, ignored")
	}
	fs.String("mail-subject-prefix", "[Dkron]", "Accepted, ignored")
	fs.Uint16("mail-port", 0, "Accepted, ignored")
	for _, name := range []string{"pre-webhook-headers", "webhook-headers", "dog-statsd-tags"} {
		fs.StringSlice(name, []string{}, "Accepted, ignored")
	}
	fs.Bool("enable-prometheus", false, "Accepted, ignored")
	fs.Bool("disable-usage-stats", false, "Accepted, ignored")
	fs.Int("agent-run-max-retries", 3, "Accepted, ignored")
	fs.Duration("agent-run-retry-initial-interval", time.Second, "Accepted, ignored")
	fs.Duration("agent-run-retry-max-interval", 30*time.Second, "Accepted, ignored")
}

// loadConfig mirrors Dkron v4.1.2 cmd/dkron.go initConfig: viper bound to the agent's flags
// (cmd/agent.go BindPFlags), env prefix DKRON with "-" -> "_" (DKRON_RETRY_JOIN,
// DKRON_BOOTSTRAP_EXPECT, ...), a dkron.{yml,json,...} config file from --config or
// /etc/dkron, $HOME/.dkron, ./config. Precedence is viper's: a flag given on the command line,
// then the env var, then the config file, then the flag's default. viper v1.21.0 decodes a
// list from a string by splitting on "," (DKRON_RETRY_JOIN="a,b"; no trimming) and a duration
// with time.ParseDuration; its decoding is weakly typed ("true", "3").
func loadConfig(v *viper.Viper, cfgFile string) (*Config, error) {
	if cfgFile != "" {
		v.SetConfigFile(cfgFile)
	} else {
		v.SetConfigName("dkron")
		v.AddConfigPath("/etc/dkron")
		v.AddConfigPath("$HOME/.dkron")
		v.AddConfigPath("./config")
	}
	v.SetEnvPrefix("dkron")
	v.SetEnvKeyReplacer(strings.NewReplacer("-", "_"))
	v.AutomaticEnv()
	if err := v.ReadInConfig(); err != nil {
		logf(lInfo, "No valid config found: Applying default values. (%v)", err)
	}
	cfg := defaultConfig()
	if err := v.Unmarshal(cfg); err != nil {
		return nil, fmt.Errorf("config: Error unmarshalling config: %s", err)
	}
	// Tags: `--tag k=v` (cmd/agent.go UnmarshalTags), else the config file's "tags" map.
	if cli := v.GetStringSlice("tag"); len(cli) > 0 {
		cfg.Tags = map[string]string{}
		for _, t := range cli {
			k, val, ok := strings.Cut(t, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("config: Error unmarshalling cli tags: invalid tag: '%s'", t)
			}
			cfg.Tags[k] = val
		}
	} else {
		cfg.Tags = v.GetStringMapString("tags")
	}
	setLogLevel(cfg.LogLevel)
	return cfg, nil
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "agent" {
		// Tests read this line to see how the stand-in was started (not a Dkron behaviour).
		fmt.Printf("dkron stand-in started with %q\n", os.Args[1:])
	}
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	root := &cobra.Command{Use: "dkron", Short: "Dkron stand-in (dkron-ha CI fixture)"}
	// Dkron v4.1.2 cmd/version.go: `dkron version` prints the version (and the Go version).
	versionCmd := &cobra.Command{Use: "version", Short: "Show version",
		Run: func(*cobra.Command, []string) { fmt.Printf("Name: Dkron\nVersion: %s\n", version) }}
	root.AddCommand(agentCommand(), raftCommand(), versionCmd)
	// Dkron v4.1.2 cmd/dkron.go Execute: cobra prints "Error: ..." and the usage to stderr, then
	// Dkron prints the error to stdout and exits 1 (an unknown flag, a failed start).
	if err := root.Execute(); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
}

func agentCommand() *cobra.Command {
	var cfgFile string
	v := viper.New()
	var cfg *Config
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Start a dkron agent",
		PreRunE: func(cmd *cobra.Command, _ []string) (err error) {
			cfg, err = loadConfig(v, cfgFile)
			if err == nil {
				// Tests read this line too: the settings after flags, env and defaults.
				fmt.Printf("dkron stand-in config: node-name=%s server=%v bootstrap-expect=%d retry-join=%q retry-interval=%s data-dir=%s bind-addr=%s advertise-addr=%s http-addr=%s rpc-port=%d\n",
					cfg.NodeName, cfg.Server, cfg.BootstrapExpect, cfg.RetryJoin, cfg.RetryInterval,
					cfg.DataDir, cfg.BindAddr, cfg.AdvertiseAddr, cfg.HTTPAddr, cfg.RPCPort)
			}
			return err
		},
		RunE: func(*cobra.Command, []string) error {
			a := newAgent(cfg)
			if err := a.Start(); err != nil {
				return err
			}
			// Dkron v4.1.2 cmd/agent.go agentRun: the signal handlers exist only from here on,
			// after Start returned (Start blocks in the retry-join loop until a join succeeds):
			// until then SIGHUP, SIGTERM and SIGINT kill the process (Go's default), as observed
			// (ARCHITECTURE.md Dkron facts).
			if code := handleSignals(a); code != 0 {
				return fmt.Errorf("exit status: %d", code)
			}
			return nil
		},
	}
	cmd.PersistentFlags().StringVar(&cfgFile, "config", "", "config file path")
	agentFlags(cmd.Flags())
	_ = v.BindPFlags(cmd.Flags())
	return cmd
}

// handleSignals mirrors Dkron v4.1.2 cmd/agent.go handleSignals: SIGHUP does not stop it;
// SIGTERM or SIGINT starts agent.Stop in a goroutine and returns 0
// without waiting for it (no running jobs or plugins to wait for here), so the process exits
// 0 while raft shuts down and before the serf leave goes out: peers see the server failed
// (status 4), not left (observed in 11 of 12 stops, ARCHITECTURE.md Dkron facts). A retry-join
// error makes it return 1.
func handleSignals(a *Agent) int {
	sigCh := make(chan os.Signal, 4)
	signal.Notify(sigCh, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	for {
		var sig os.Signal
		select {
		case sig = <-sigCh:
		case err := <-a.retryJoinCh:
			logf(lError, "agent: Retry join failed: %v", err)
			return 1
		}
		logf(lInfo, "Caught signal: %v", sig)
		if sig != syscall.SIGHUP {
			break
		}
		// Dkron reloads its config and re-applies the tags: the stand-in only goes on.
		logf(lInfo, "Reloading configuration...")
	}
	logf(lInfo, "agent: Gracefully shutting down agent...")
	go func() {
		if err := a.Stop(); err != nil {
			logf(lError, "unable to stop agent: %v", err)
		}
	}()
	graceful := make(chan struct{})
	close(graceful)
	// As in Dkron, a second signal already waiting competes with the closed channel.
	select {
	case <-sigCh:
		return 1
	case <-graceful:
		return 0
	}
}

// raftCommand: `dkron raft list-peers|remove-peer --rpc-addr=ADDR [--peer-id=ID]` as Dkron
// v4.1.2 cmd/raft.go (a gRPC client of the agent; list-peers prints a Node/ID/Address/State/
// Voter table).
func raftCommand() *cobra.Command {
	var rpcAddr, peerID string
	cmd := &cobra.Command{Use: "raft [command]", Short: "Command to perform some raft operations"}
	cmd.PersistentFlags().StringVar(&rpcAddr, "rpc-addr", "{{ GetPrivateIP }}:6868", "gRPC address of the agent.")
	list := &cobra.Command{Use: "list-peers", Short: "Command to list raft peers",
		RunE: func(*cobra.Command, []string) error {
			addr, err := parseSingleIPTemplate(rpcAddr)
			if err != nil {
				return err
			}
			servers, _, err := rpcGetConfiguration(addr)
			if err != nil {
				return err
			}
			// Dkron prints it with columnize: columns two spaces apart.
			w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprint(w, "Node\tID\tAddress\tState\tVoter\n")
			for _, s := range servers {
				state := "follower"
				if s.Leader {
					state = "leader"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%v\n", s.Node, s.ID, s.Address, state, s.Voter)
			}
			w.Flush()
			return nil
		}}
	remove := &cobra.Command{Use: "remove-peer", Short: "Command to remove a peer from raft",
		RunE: func(*cobra.Command, []string) error {
			addr, err := parseSingleIPTemplate(rpcAddr)
			if err != nil {
				return err
			}
			if err := rpcRemovePeer(addr, peerID); err != nil {
				return err
			}
			logf(lInfo, "Peer removed")
			return nil
		}}
	remove.Flags().StringVar(&peerID, "peer-id", "", "Remove a Dkron server with the given ID from the Raft configuration.")
	cmd.AddCommand(list, remove)
	return cmd
}

// Levels as logrus names them (Dkron v4.1.2 dkron/log.go InitLogger: an unknown level is
// info). The agent's logs go to stderr, as Dkron's agent logger (logrus.New) writes them.
const (
	lDebug = iota
	lInfo
	lWarn
	lError
)

var (
	logLevel   = lInfo
	levelNames = []string{"debug", "info", "warning", "error"}
)

func setLogLevel(s string) {
	switch strings.ToLower(s) {
	case "trace", "debug":
		logLevel = lDebug
	case "warn", "warning":
		logLevel = lWarn
	case "error", "fatal", "panic":
		logLevel = lError
	default:
		logLevel = lInfo
	}
}

func logf(level int, format string, args ...any) {
	if level >= logLevel {
		log.Printf("level="+levelNames[level]+" msg="+format, args...)
	}
}

// fatalf: logrus Fatal, which Dkron uses for a failed listener or raft setup, exits 1.
func fatalf(format string, args ...any) {
	log.Printf("level=fatal msg="+format, args...)
	os.Exit(1)
}
