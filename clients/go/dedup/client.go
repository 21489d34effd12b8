// Package dedup is the Go client of the Kafka dedup sidecar.
//
// The sidecar runs next to the application, owns the Kafka consumer and the idempotent
// producer, and streams de-duplicated deliveries over gRPC. The application processes each
// delivery, then acks it; the sidecar commits an offset only once everything before it is
// acked. This package wraps the generated stubs (package dedupv1) with what every application
// needs:
//
//   - Subscribe returns a Stream of frames: the deliveries the sidecar sent together.
//   - Message.Ack is cheap. Acks are gathered for a few milliseconds, or up to a number of ids,
//     and sent as one Ack call; the returned PendingAck tells its own result. Options.PlainAcks
//     sends one call per ack instead, and AckMany sends one call for ids the caller gathered.
//   - Publish and PublishBatch produce through the sidecar's idempotent producer: the same
//     idempotency key is written to Kafka once.
//
// Everything is safe for concurrent use.
package dedup

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

// AckResult is the sidecar's answer for one delivery id.
type AckResult = dedupv1.AckResult

// The answers to Ack, Nack and ExtendDeadline, per id.
const (
	// AckOK: settled (or, for Nack and ExtendDeadline, done).
	AckOK = dedupv1.AckResult_ACK_RESULT_OK
	// AckStale: the partition moved to another consumer since the delivery; it will be
	// redelivered there, and the store keeps it from being applied twice once acked.
	AckStale = dedupv1.AckResult_ACK_RESULT_STALE
	// AckUnknown: no such delivery id in this sidecar.
	AckUnknown = dedupv1.AckResult_ACK_RESULT_UNKNOWN
	// AckAlreadyAcked: acked before; harmless.
	AckAlreadyAcked = dedupv1.AckResult_ACK_RESULT_ALREADY_ACKED
)

// Options configure a Client. The zero value is a working configuration.
type Options struct {
	// Token is sent as "authorization: Bearer <token>" on every call, for a sidecar that sets
	// server.auth_token.
	Token string
	// AckLinger is how long acks are gathered before one Ack call. Default 5ms.
	AckLinger time.Duration
	// AckMaxIDs is the most ids in one gathered Ack call. Default 1000; keep it at or below
	// the sidecar's server.max_ids_per_call.
	AckMaxIDs int
	// AckTimeout bounds each gathered Ack call. Default 30s.
	AckTimeout time.Duration
	// PlainAcks makes Message.Ack send one Ack call per message: the simplest protocol use,
	// and the slowest.
	PlainAcks bool
	// AckRetry is how long an Ack call that fails with UNAVAILABLE (the sidecar's store or
	// Kafka unreachable, the sidecar restarting) is made again, with a growing pause, and never
	// past the message's ack deadline: an ack is idempotent (a repeat answers ALREADY_ACKED),
	// and one that lands in time spares the app a redelivery. Default 10s; negative: no retry.
	AckRetry time.Duration
	// Streaming makes Publish write on one StreamingPublish call per worker, shared by
	// concurrent calls, instead of making a Publish call each: the sidecar then pays a stream
	// message per record rather than a call.
	Streaming bool
	// TLS dials the sidecar with TLS (server.tls_cert_file), and with a client certificate for
	// mTLS (server.tls_client_ca_file). Nil: plaintext, which suits loopback and Unix sockets.
	TLS *TLSOptions
	// DialOptions are added after the defaults (plaintext or TLS, and a 64 MiB receive limit
	// for large frames).
	DialOptions []grpc.DialOption
	// TargetOnly uses the target alone with a sidecar of several worker processes
	// (server.workers), which then delivers only that worker's partitions. By default the
	// client lists the workers (ListWorkers) when the first stream opens, subscribes on every
	// one, sends each ack to the worker that delivered it, and spreads publishes over them.
	TargetOnly bool
}

// TLSOptions are the files of a TLS or mTLS connection to the sidecar, all PEM.
type TLSOptions struct {
	// CAFile is the CA that signed the sidecar's certificate. Empty: the system's CAs.
	CAFile string
	// CertFile and KeyFile are the client certificate and key, for mTLS. Both or neither.
	CertFile, KeyFile string
	// ServerName is checked against the sidecar's certificate when it is not the target's
	// host (for example a certificate for "sidecar.local" dialled at 127.0.0.1).
	ServerName string
}

// Config is the tls.Config these options describe.
func (t *TLSOptions) Config() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("dedup: TLS CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("dedup: TLS CA file %q holds no PEM certificate", t.CAFile)
		}
		cfg.RootCAs = pool
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return nil, errors.New("dedup: TLS CertFile and KeyFile go together (mTLS)")
	}
	if t.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("dedup: TLS client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// Client talks to one sidecar: to each of its worker processes once it listed them.
type Client struct {
	target string
	dial   []grpc.DialOption
	conn   *grpc.ClientConn
	stub   dedupv1.DedupServiceClient
	opts   Options

	mu         sync.Mutex // guards the worker slices while ListWorkers fills them in
	discovered bool
	workers    []*worker
	routes     sync.Map // delivery id prefix (one worker process) -> *worker
	turn       atomic.Uint64
}

// worker is one worker process of the sidecar: its connection, its gathered acks, and its
// publish stream (Options.Streaming).
type worker struct {
	conn *grpc.ClientConn
	stub dedupv1.DedupServiceClient
	acks *ackBatcher
	pub  *publishStream
}

// New connects to the sidecar at target: "host:port", "unix:///run/dedup/sidecar.sock" for a
// sidecar on a Unix socket, or any gRPC target. The connection is made lazily, on the first call.
func New(target string, opts Options) (*Client, error) {
	if opts.AckLinger <= 0 {
		opts.AckLinger = 5 * time.Millisecond
	}
	if opts.AckMaxIDs <= 0 {
		opts.AckMaxIDs = 1000
	}
	if opts.AckTimeout <= 0 {
		opts.AckTimeout = 30 * time.Second
	}
	if opts.AckRetry == 0 {
		opts.AckRetry = 10 * time.Second
	}
	transport := insecure.NewCredentials()
	if opts.TLS != nil {
		cfg, err := opts.TLS.Config()
		if err != nil {
			return nil, err
		}
		transport = credentials.NewTLS(cfg)
	}
	dial := []grpc.DialOption{
		grpc.WithTransportCredentials(transport),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
	}
	if opts.Token != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer("Bearer "+opts.Token)))
	}
	dial = append(dial, opts.DialOptions...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("dedup: connecting to %q: %w", target, err)
	}
	c := &Client{target: target, dial: dial, conn: conn, stub: dedupv1.NewDedupServiceClient(conn), opts: opts}
	c.workers = []*worker{c.newWorker(conn)}
	return c, nil
}

func (c *Client) newWorker(conn *grpc.ClientConn) *worker {
	w := &worker{conn: conn, stub: dedupv1.NewDedupServiceClient(conn)}
	w.acks = newAckBatcher(c.opts.AckLinger, c.opts.AckMaxIDs, func(ids []string) ([]AckResult, error) {
		ctx, cancel := context.WithTimeout(context.Background(), c.opts.AckTimeout)
		defer cancel()
		return c.ackOn(ctx, w, ids)
	})
	w.pub = newPublishStream(w.stub)
	return w
}

// Stub is the generated client, for calls this package does not wrap.
func (c *Client) Stub() dedupv1.DedupServiceClient { return c.stub }

// Workers lists the sidecar's worker processes (ListWorkers) and connects to each one, once,
// and returns how many there are. A sidecar without ListWorkers counts as one worker.
func (c *Client) Workers(ctx context.Context) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.discovered || c.opts.TargetOnly {
		return len(c.workers), nil
	}
	resp, err := c.stub.ListWorkers(ctx, &dedupv1.ListWorkersRequest{})
	if status.Code(err) == codes.Unimplemented {
		resp, err = &dedupv1.ListWorkersResponse{}, nil
	}
	if err != nil {
		return 0, err
	}
	c.discovered = true
	if len(resp.Workers) <= 1 {
		return 1, nil
	}
	workers := make([]*worker, len(resp.Workers))
	for i, w := range resp.Workers {
		if w.Index == resp.ThisWorker {
			workers[i] = c.workers[0]
			continue
		}
		target := withPort(c.target, w.Port)
		if w.UnixSocket != "" {
			target = "unix://" + w.UnixSocket
		}
		conn, err := grpc.NewClient(target, c.dial...)
		if err != nil {
			return 0, fmt.Errorf("dedup: connecting to worker %d at %q: %w", w.Index, target, err)
		}
		workers[i] = c.newWorker(conn)
	}
	c.workers = workers
	return len(workers), nil
}

// withPort is target with its port replaced: another worker on the host the client dialled.
func withPort(target string, port int32) string {
	if i := strings.LastIndexByte(target, ':'); i >= 0 && !strings.HasSuffix(target[:i], ":") {
		return target[:i+1] + strconv.Itoa(int(port))
	}
	return target + ":" + strconv.Itoa(int(port))
}

func (c *Client) all() []*worker {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.workers
}

// workerOf is the worker that delivered id (the first one when it is not known).
func (c *Client) workerOf(id string) *worker {
	prefix, _, _ := strings.Cut(id, ".")
	if w, ok := c.routes.Load(prefix); ok {
		return w.(*worker)
	}
	return c.all()[0]
}

// next is the worker whose turn it is to publish.
func (c *Client) next() *worker {
	workers := c.all()
	if len(workers) == 1 {
		return workers[0]
	}
	return workers[c.turn.Add(1)%uint64(len(workers))]
}

// Close sends the acks gathered so far, waits for their answers until ctx is done, and closes
// the connections.
func (c *Client) Close(ctx context.Context) error {
	errs := []error{c.FlushAcks(ctx)}
	for _, w := range c.all() {
		w.pub.close()
		errs = append(errs, w.conn.Close())
	}
	return errors.Join(errs...)
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(b)}, nil
}

// RequireTransportSecurity is false: a sidecar on loopback or a Unix socket, in the same pod,
// takes a token over plaintext.
func (bearer) RequireTransportSecurity() bool { return false }
