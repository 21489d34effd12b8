package dedup

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

// PendingAck is an ack on its way to the sidecar.
type PendingAck struct {
	done   chan struct{}
	result AckResult
	err    error
}

func newPendingAck() *PendingAck { return &PendingAck{done: make(chan struct{})} }

// Done is closed once the sidecar has answered, or the call carrying the ack failed.
func (a *PendingAck) Done() <-chan struct{} { return a.done }

// Wait returns the sidecar's answer for this ack. The error is the gRPC status error of the
// Ack call that carried it (nothing in that call was acked), or ctx's error.
func (a *PendingAck) Wait(ctx context.Context) (AckResult, error) {
	select {
	case <-a.done:
		return a.result, a.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (a *PendingAck) settle(results []AckResult, i int, err error) {
	if err == nil {
		a.result = results[i]
	} else {
		a.err = err
	}
	close(a.done)
}

// ackBatcher gathers ids for linger, or until max ids, and sends them in one call.
type ackBatcher struct {
	linger time.Duration
	max    int
	send   func(ids []string) ([]AckResult, error)

	mu      sync.Mutex
	ids     []string
	waiting []*PendingAck
	timer   *time.Timer
	calls   map[chan struct{}]struct{} // Ack calls sent and not yet answered, each closed when it is
}

func newAckBatcher(linger time.Duration, max int, send func([]string) ([]AckResult, error)) *ackBatcher {
	return &ackBatcher{linger: linger, max: max, send: send, calls: map[chan struct{}]struct{}{}}
}

func (b *ackBatcher) add(id string) *PendingAck {
	a := newPendingAck()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ids = append(b.ids, id)
	b.waiting = append(b.waiting, a)
	if len(b.ids) >= b.max {
		b.flushLocked()
	} else if b.timer == nil {
		b.timer = time.AfterFunc(b.linger, b.flush)
	}
	return a
}

func (b *ackBatcher) flush() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
}

func (b *ackBatcher) flushLocked() {
	if b.timer != nil {
		b.timer.Stop() // a timer that already fired finds nothing, or the next acks, to send
		b.timer = nil
	}
	if len(b.ids) == 0 {
		return
	}
	ids, waiting := b.ids, b.waiting
	b.ids, b.waiting = nil, nil
	call := make(chan struct{})
	b.calls[call] = struct{}{}
	go func() {
		defer func() {
			b.mu.Lock()
			delete(b.calls, call)
			b.mu.Unlock()
			close(call)
		}()
		results, err := b.send(ids)
		if err != nil {
			err = fmt.Errorf("dedup: the Ack call for %d ids failed, none of them was acked: %w", len(ids), err)
		}
		for i, a := range waiting {
			a.settle(results, i, err)
		}
	}()
}

// drain sends what is gathered and waits for every Ack call sent until now.
func (b *ackBatcher) drain(ctx context.Context) error {
	b.mu.Lock()
	b.flushLocked()
	calls := make([]chan struct{}, 0, len(b.calls))
	for call := range b.calls {
		calls = append(calls, call)
	}
	b.mu.Unlock()
	for _, call := range calls {
		select {
		case <-call:
		case <-ctx.Done():
			return fmt.Errorf("dedup: waiting for the answers to Ack calls: %w", ctx.Err())
		}
	}
	return nil
}

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
