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
	// TLS dials the sidecar with TLS (server.tls_cert_file), and with a client certificate for
	// mTLS (server.tls_client_ca_file). Nil: plaintext, which suits loopback and Unix sockets.
	TLS *TLSOptions
	// DialOptions are added after the defaults (plaintext or TLS, and a 64 MiB receive limit
	// for large frames).
	DialOptions []grpc.DialOption
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

// Client talks to one sidecar.
type Client struct {
	conn *grpc.ClientConn
	stub dedupv1.DedupServiceClient
	opts Options
	acks *ackBatcher
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
	conn, err := grpc.NewClient(target, append(dial, opts.DialOptions...)...)
	if err != nil {
		return nil, fmt.Errorf("dedup: connecting to %q: %w", target, err)
	}
	c := &Client{conn: conn, stub: dedupv1.NewDedupServiceClient(conn), opts: opts}
	c.acks = newAckBatcher(opts.AckLinger, opts.AckMaxIDs, func(ids []string) ([]AckResult, error) {
		ctx, cancel := context.WithTimeout(context.Background(), opts.AckTimeout)
		defer cancel()
		return c.AckMany(ctx, ids)
	})
	return c, nil
}

// Stub is the generated client, for calls this package does not wrap.
func (c *Client) Stub() dedupv1.DedupServiceClient { return c.stub }

// Close sends the acks gathered so far, waits for their answers until ctx is done, and closes
// the connection.
func (c *Client) Close(ctx context.Context) error {
	flushErr := c.FlushAcks(ctx)
	return errors.Join(flushErr, c.conn.Close())
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

// Stream is an open Subscribe call.
type Stream struct {
	client *Client
	call   grpc.ServerStreamingClient[dedupv1.SubscribeResponse]
	cancel context.CancelFunc
}

// Subscribe opens a stream of deliveries. Un-acked deliveries are redelivered (to this or
// another stream) after their deadline or when the stream closes.
func (c *Client) Subscribe(ctx context.Context, o SubscribeOptions) (*Stream, error) {
	ctx, cancel := context.WithCancel(ctx)
	call, err := c.stub.Subscribe(ctx, &dedupv1.SubscribeRequest{
		Topics:           o.Topics,
		MaxInFlight:      o.MaxInFlight,
		MaxInFlightBytes: o.MaxInFlightBytes,
		MaxBatch:         o.MaxBatch,
		Ordering:         o.Ordering,
	})
	if err != nil {
		cancel()
		return nil, err
	}
	return &Stream{client: c, call: call, cancel: cancel}, nil
}

// Recv waits for the next frame. It returns io.EOF when the sidecar ends the stream, and the
// call's gRPC status error otherwise (for example INVALID_ARGUMENT for a topic the sidecar
// does not consume).
func (s *Stream) Recv() ([]*Message, error) {
	frame, err := s.call.Recv()
	if err != nil {
		return nil, err
	}
	out := make([]*Message, len(frame.Deliveries))
	for i, d := range frame.Deliveries {
		out[i] = &Message{Delivery: d, client: s.client}
	}
	return out, nil
}

// Close ends the stream. Its un-acked deliveries go back to the sidecar for redelivery.
func (s *Stream) Close() { s.cancel() }

// Message is one delivery: the record's fields, through the embedded Delivery.
type Message struct {
	*dedupv1.Delivery
	client *Client
}

// Ack settles the message once its side effects are done. It does not block: the ack joins
// the next gathered Ack call (or, with Options.PlainAcks, makes its own), and the returned
// PendingAck tells the result.
func (m *Message) Ack() *PendingAck {
	if m.client.opts.PlainAcks {
		a := newPendingAck()
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), m.client.opts.AckTimeout)
			defer cancel()
			results, err := m.client.AckMany(ctx, []string{m.DeliveryId})
			a.settle(results, 0, err)
		}()
		return a
	}
	return m.client.acks.add(m.DeliveryId)
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
	resp, err := c.stub.Ack(ctx, &dedupv1.AckRequest{DeliveryIds: ids})
	if err != nil {
		return nil, err
	}
	return checkResults(resp.Results, len(ids))
}

// FlushAcks sends the acks gathered so far and waits for the answers to every Ack call sent,
// or until ctx is done.
func (c *Client) FlushAcks(ctx context.Context) error { return c.acks.drain(ctx) }

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
	req := &dedupv1.NackRequest{DeliveryIds: ids, DeadLetter: opts.DeadLetter, Reason: opts.Reason}
	if opts.Delay != nil {
		seconds := opts.Delay.Seconds()
		req.DelaySeconds = &seconds
	}
	resp, err := c.stub.Nack(ctx, req)
	if err != nil {
		return nil, err
	}
	return checkResults(resp.Results, len(ids))
}

// ExtendDeadline gives deliveries more time before they are redelivered.
func (c *Client) ExtendDeadline(ctx context.Context, ids []string, seconds int32) ([]AckResult, error) {
	resp, err := c.stub.ExtendDeadline(ctx, &dedupv1.ExtendDeadlineRequest{DeliveryIds: ids, Seconds: seconds})
	if err != nil {
		return nil, err
	}
	return checkResults(resp.Results, len(ids))
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
