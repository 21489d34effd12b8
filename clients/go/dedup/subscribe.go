package dedup

import (
	"context"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

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
