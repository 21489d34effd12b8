package dedup

import (
	"context"
	"fmt"
	"sync"
	"time"
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
