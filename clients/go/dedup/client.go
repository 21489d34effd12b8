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
	"io"
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

// SubscribeOptions are the flow-control bounds of one stream; zero means the sidecar's default.
type SubscribeOptions struct {
	// Topics to receive, a subset of the sidecar's kafka.topics. Empty: all of them.
	Topics []string
	// MaxInFlight is the most un-acked deliveries outstanding on the stream.
	MaxInFlight int32
	// MaxInFlightBytes is the most un-acked payload bytes outstanding on the stream.
	MaxInFlightBytes int64
	// MaxBatch is the most deliveries in one frame.
	MaxBatch int32
	// Ordering narrows the sidecar's delivery.ordering for these topics
	// (dedupv1.Ordering_ORDERING_KEY or ORDERING_PARTITION); unspecified keeps the sidecar's.
	Ordering dedupv1.Ordering
}

// Stream is an open Subscribe call: one per worker of the sidecar, merged.
type Stream struct {
	client *Client
	calls  []grpc.ServerStreamingClient[dedupv1.SubscribeResponse]
	cancel context.CancelFunc
	frames chan received // with several workers: every worker's frames, then its end
	open   int           // workers whose stream has not ended
	// Per worker, while its stream is open: when it opened (Unix ns; 0 when closed), and
	// whether a frame came on it. See pump.
	opened []atomic.Int64
	fed    []atomic.Bool
}

type received struct {
	worker *worker
	frame  *dedupv1.SubscribeResponse
	err    error
}

// WorkerRetry is how long a worker may stay unreachable while another worker's stream is open:
// its stream is opened again meanwhile, and the others keep delivering (see Stream.Recv).
const WorkerRetry = 60 * time.Second

// Subscribe opens a stream of deliveries. Un-acked deliveries are redelivered (to this or
// another stream) after their deadline or when the stream closes. With several workers it
// subscribes on each one; MaxInFlight and MaxInFlightBytes are shared out among them (each
// gets its share, rounded up).
func (c *Client) Subscribe(ctx context.Context, o SubscribeOptions) (*Stream, error) {
	n, err := c.Workers(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	req := &dedupv1.SubscribeRequest{
		Topics:           o.Topics,
		MaxInFlight:      int32((int64(o.MaxInFlight) + int64(n) - 1) / int64(n)),
		MaxInFlightBytes: (o.MaxInFlightBytes + int64(n) - 1) / int64(n),
		MaxBatch:         o.MaxBatch,
		Ordering:         o.Ordering,
	}
	workers := c.all()
	s := &Stream{client: c, cancel: cancel}
	for _, w := range workers {
		call, err := w.stub.Subscribe(ctx, req)
		if err != nil {
			cancel()
			return nil, err
		}
		s.calls = append(s.calls, call)
	}
	if len(workers) > 1 {
		s.frames, s.open = make(chan received, len(workers)), len(workers)
		s.opened, s.fed = make([]atomic.Int64, len(workers)), make([]atomic.Bool, len(workers))
		for i, w := range workers {
			go s.pump(ctx, i, w, s.calls[i], req)
		}
	}
	return s, nil
}

// pump passes one worker's frames on to Recv, then the error that ended its stream. A worker
// that becomes unreachable (UNAVAILABLE: it died and its supervisor is starting it again, or it
// is not up yet after a restart of the sidecar) is
// subscribed to again, with a growing pause, while another worker's stream is alive, for up to
// WorkerRetry: ending every stream instead would hand the other workers' in-flight records back
// and count an attempt on each, once per reconnect. A stream is alive once a frame came on it
// or it has been open a second: a retry of a worker that is going away proves nothing.
func (s *Stream) pump(
	ctx context.Context, i int, w *worker, call grpc.ServerStreamingClient[dedupv1.SubscribeResponse],
	req *dedupv1.SubscribeRequest,
) {
	pause, downSince := 100*time.Millisecond, time.Time{}
	for {
		s.opened[i].Store(time.Now().UnixNano())
		s.fed[i].Store(false)
		var err error
		for {
			var frame *dedupv1.SubscribeResponse
			if frame, err = call.Recv(); err != nil {
				break
			}
			pause, downSince = 100*time.Millisecond, time.Time{}
			s.fed[i].Store(true)
			if !s.pass(ctx, received{worker: w, frame: frame}) {
				return
			}
		}
		s.opened[i].Store(0)
		if err != io.EOF {
			if downSince.IsZero() {
				downSince = time.Now()
			}
			if status.Code(err) == codes.Unavailable && s.otherAlive(ctx, i, downSince) {
				select {
				case <-time.After(pause):
				case <-ctx.Done():
					return
				}
				pause = min(2*pause, 2*time.Second)
				if call, err = w.stub.Subscribe(ctx, req); err == nil {
					continue
				}
			}
		}
		s.pass(ctx, received{worker: w, err: err})
		return
	}
}

func (s *Stream) pass(ctx context.Context, r received) bool {
	select {
	case s.frames <- r:
		return true
	case <-ctx.Done():
		return false
	}
}

// otherAlive tells whether to open worker i's stream again: once another worker's stream proves
// alive. False when no other stream is open (the sidecar is stopping, or gone), or after
// WorkerRetry. A stream still unproven (just opened, as at a sidecar's start) is waited for.
func (s *Stream) otherAlive(ctx context.Context, i int, downSince time.Time) bool {
	for time.Since(downSince) <= WorkerRetry {
		open := false
		for j := range s.opened {
			since := s.opened[j].Load()
			if j == i || since == 0 {
				continue
			}
			if s.fed[j].Load() || time.Since(time.Unix(0, since)) >= time.Second {
				return true
			}
			open = true
		}
		if !open {
			return false
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return false
		}
	}
	return false
}

// Recv waits for the next frame. It returns io.EOF when the sidecar ends the stream (every
// worker's), and the call's gRPC status error otherwise (for example INVALID_ARGUMENT for a
// topic the sidecar does not consume). With several workers, a worker that is restarting is
// waited for while the others deliver (see WorkerRetry); any other failure of a worker's
// stream ends the whole Stream.
func (s *Stream) Recv() ([]*Message, error) {
	if s.frames == nil {
		frame, err := s.calls[0].Recv()
		if err != nil {
			return nil, err
		}
		return s.messages(s.client.all()[0], frame), nil
	}
	for {
		if s.open == 0 {
			return nil, io.EOF
		}
		r := <-s.frames
		if r.err == io.EOF {
			s.open--
			continue
		}
		if r.err != nil {
			s.cancel()
			s.open = 0
			return nil, r.err
		}
		if len(r.frame.Deliveries) > 0 {
			prefix, _, _ := strings.Cut(r.frame.Deliveries[0].DeliveryId, ".")
			s.client.routes.Store(prefix, r.worker)
		}
		return s.messages(r.worker, r.frame), nil
	}
}

func (s *Stream) messages(w *worker, frame *dedupv1.SubscribeResponse) []*Message {
	out := make([]*Message, len(frame.Deliveries))
	for i, d := range frame.Deliveries {
		out[i] = &Message{Delivery: d, client: s.client, worker: w}
	}
	return out
}

// Close ends the stream. Its un-acked deliveries go back to the sidecar for redelivery.
func (s *Stream) Close() { s.cancel() }

// Message is one delivery: the record's fields, through the embedded Delivery.
type Message struct {
	*dedupv1.Delivery
	client *Client
	worker *worker // the worker that delivered it, which its Ack goes to
}

// Ack settles the message once its side effects are done. It does not block: the ack joins
// the next gathered Ack call (or, with Options.PlainAcks, makes its own), and the returned
// PendingAck tells the result.
func (m *Message) Ack() *PendingAck {
	if m.worker == nil {
		m.worker = m.client.workerOf(m.DeliveryId)
	}
	if m.client.opts.PlainAcks {
		a := newPendingAck()
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), m.client.opts.AckTimeout)
			defer cancel()
			if m.DeadlineMs > 0 {
				var stop context.CancelFunc
				ctx, stop = context.WithDeadline(ctx, time.UnixMilli(m.DeadlineMs))
				defer stop()
			}
			results, err := m.client.ackOn(ctx, m.worker, []string{m.DeliveryId})
			a.settle(results, 0, err)
		}()
		return a
	}
	return m.worker.acks.add(m.DeliveryId)
}

// Nack gives the message back for redelivery (after opts.Delay, or the sidecar's backoff),
// or with opts.DeadLetter sends it to the dead-letter topic.
func (m *Message) Nack(ctx context.Context, opts NackOptions) (AckResult, error) {
	results, err := m.client.Nack(ctx, []string{m.DeliveryId}, opts)
	if err != nil {
		return 0, err
	}
	return results[0], nil
}

// AckMany acks ids in one call, not gathered with other acks: the plain path. The error is
// the call's gRPC status error (UNAVAILABLE when the sidecar's store is down: nothing was
// acked, retry).
func (c *Client) AckMany(ctx context.Context, ids []string) ([]AckResult, error) {
	return c.perWorker(ctx, ids, c.ackOn)
}

func (c *Client) ackOn(ctx context.Context, w *worker, ids []string) ([]AckResult, error) {
	req := &dedupv1.AckRequest{DeliveryIds: ids}
	var resp *dedupv1.AckResponse
	err := retryUnavailable(ctx, c.opts.AckRetry, func(ctx context.Context) (err error) {
		resp, err = w.stub.Ack(ctx, req)
		return err
	})
	if err != nil {
		return nil, err
	}
	return checkResults(resp.Results, len(ids))
}

// retryUnavailable makes call again, after a growing pause, while it fails with UNAVAILABLE,
// for up to budget (not at all when budget is negative) and never past ctx's deadline.
func retryUnavailable(ctx context.Context, budget time.Duration, call func(context.Context) error) error {
	until := time.Now().Add(budget)
	if d, ok := ctx.Deadline(); ok && d.Before(until) {
		until = d
	}
	pause := 50 * time.Millisecond
	for {
		err := call(ctx)
		if status.Code(err) != codes.Unavailable || budget < 0 || time.Now().Add(pause).After(until) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(pause):
		}
		pause = min(2*pause, time.Second)
	}
}

// perWorker makes one call per worker that delivered some of ids; the results are in the
// order of ids. Any call's error is the error.
func (c *Client) perWorker(
	ctx context.Context, ids []string, call func(context.Context, *worker, []string) ([]AckResult, error),
) ([]AckResult, error) {
	if workers := c.all(); len(workers) == 1 {
		return call(ctx, workers[0], ids)
	}
	groups := map[*worker][]int{}
	for i, id := range ids {
		w := c.workerOf(id)
		groups[w] = append(groups[w], i)
	}
	out := make([]AckResult, len(ids))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for w, positions := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mine := make([]string, len(positions))
			for j, i := range positions {
				mine[j] = ids[i]
			}
			results, err := call(ctx, w, mine)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			for j, i := range positions {
				out[i] = results[j]
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		return nil, errs[0]
	}
	return out, nil
}

// FlushAcks sends the acks gathered so far and waits for the answers to every Ack call sent,
// or until ctx is done.
func (c *Client) FlushAcks(ctx context.Context) error {
	var errs []error
	for _, w := range c.all() {
		errs = append(errs, w.acks.drain(ctx))
	}
	return errors.Join(errs...)
}

// NackOptions say what happens to nacked deliveries.
type NackOptions struct {
	// Delay before redelivery; nil means the sidecar's exponential backoff.
	Delay *time.Duration
	// DeadLetter sends the records to the sidecar's dead-letter topic instead of redelivering.
	DeadLetter bool
	// Reason travels with a dead-lettered record.
	Reason string
}

// Nack gives deliveries back; see Message.Nack.
func (c *Client) Nack(ctx context.Context, ids []string, opts NackOptions) ([]AckResult, error) {
	return c.perWorker(ctx, ids, func(ctx context.Context, w *worker, ids []string) ([]AckResult, error) {
		req := &dedupv1.NackRequest{DeliveryIds: ids, DeadLetter: opts.DeadLetter, Reason: opts.Reason}
		if opts.Delay != nil {
			seconds := opts.Delay.Seconds()
			req.DelaySeconds = &seconds
		}
		resp, err := w.stub.Nack(ctx, req)
		if err != nil {
			return nil, err
		}
		return checkResults(resp.Results, len(ids))
	})
}

// ExtendDeadline gives deliveries more time before they are redelivered.
func (c *Client) ExtendDeadline(ctx context.Context, ids []string, seconds int32) ([]AckResult, error) {
	return c.perWorker(ctx, ids, func(ctx context.Context, w *worker, ids []string) ([]AckResult, error) {
		resp, err := w.stub.ExtendDeadline(ctx, &dedupv1.ExtendDeadlineRequest{DeliveryIds: ids, Seconds: seconds})
		if err != nil {
			return nil, err
		}
		return checkResults(resp.Results, len(ids))
	})
}

func checkResults(results []AckResult, want int) ([]AckResult, error) {
	if len(results) != want {
		return nil, status.Errorf(codes.Internal, "dedup: the sidecar answered %d results for %d ids", len(results), want)
	}
	return results, nil
}

// DeriveKey is the idempotency key of the index-th record published while handling the
// delivery whose key is inputKey. A redelivered input then republishes its outputs under the
// same keys, and the sidecar writes each of them once.
func DeriveKey(inputKey string, index int) string {
	return inputKey + "/" + strconv.Itoa(index)
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(b)}, nil
}

// RequireTransportSecurity is false: a sidecar on loopback or a Unix socket, in the same pod,
// takes a token over plaintext.
func (bearer) RequireTransportSecurity() bool { return false }
