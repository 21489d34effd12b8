package dedup

import (
	"context"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

// publishStream is the StreamingPublish call that concurrent Publish calls of one worker share
// (Options.Streaming). Each record carries a request id; one goroutine per call reads the
// answers and hands each to its caller. A call is opened on first use, and again after the
// last one ended.
type publishStream struct {
	stub dedupv1.DedupServiceClient

	mu     sync.Mutex // guards cur, next, closed and each call's waiting (never held across Send)
	cur    *publishCall
	next   uint64
	closed bool
}

// publishCall is one StreamingPublish call and the callers waiting for its answers.
type publishCall struct {
	// sendMu makes one Send at a time. It is apart from publishStream.mu: a Send that waits on
	// flow control (the sidecar reads no more until some answers are read) must not keep the
	// reading goroutine from handing answers out.
	sendMu  sync.Mutex
	call    grpc.BidiStreamingClient[dedupv1.StreamingPublishRequest, dedupv1.StreamingPublishResponse]
	cancel  context.CancelFunc
	waiting map[uint64]chan *dedupv1.StreamingPublishResult // guarded by publishStream.mu
	err     error                                           // why the call ended; set before waiting's channels close
}

// ended is the error of a publish whose call ended before its answer: the call's own status
// (UNAUTHENTICATED, say, or UNAVAILABLE while the sidecar stops), else UNAVAILABLE.
func (pc *publishCall) ended() error {
	if s, ok := status.FromError(pc.err); ok && pc.err != nil && s.Code() != codes.OK && s.Code() != codes.Unknown {
		return s.Err()
	}
	return status.Error(codes.Unavailable,
		"dedup: the publish stream ended before the answer; retry with the same idempotency key")
}

func newPublishStream(stub dedupv1.DedupServiceClient) *publishStream {
	return &publishStream{stub: stub}
}

// publish writes one record and waits for its answer, or for ctx.
func (p *publishStream) publish(ctx context.Context, req *dedupv1.PublishRequest) (*dedupv1.StreamingPublishResult, error) {
	answer := make(chan *dedupv1.StreamingPublishResult, 1)
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, status.Error(codes.Canceled, "dedup: the client is closed")
	}
	if p.cur == nil {
		streamCtx, cancel := context.WithCancel(context.Background())
		call, err := p.stub.StreamingPublish(streamCtx)
		if err != nil {
			cancel()
			p.mu.Unlock()
			return nil, err
		}
		p.cur = &publishCall{call: call, cancel: cancel, waiting: map[uint64]chan *dedupv1.StreamingPublishResult{}}
		go p.read(p.cur)
	}
	pc := p.cur
	p.next++
	id := p.next
	pc.waiting[id] = answer
	p.mu.Unlock()
	pc.sendMu.Lock()
	err := pc.call.Send(&dedupv1.StreamingPublishRequest{RequestId: id, Publish: req})
	pc.sendMu.Unlock()
	if err != nil {
		p.forget(pc, id)
		// The call ended; read sees why and lets it go, and the next publish opens another.
		return nil, status.Errorf(codes.Unavailable,
			"dedup: the publish stream ended (%v); retry with the same idempotency key", err)
	}
	select {
	case r, ok := <-answer:
		if !ok {
			return nil, pc.ended()
		}
		return r, nil
	case <-ctx.Done():
		p.forget(pc, id)
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

func (p *publishStream) forget(pc *publishCall, id uint64) {
	p.mu.Lock()
	delete(pc.waiting, id)
	p.mu.Unlock()
}

// read hands each answer of pc to its caller until the call ends; then every caller still
// waiting on pc hears that it ended.
func (p *publishStream) read(pc *publishCall) {
	for {
		resp, err := pc.call.Recv()
		p.mu.Lock()
		if err != nil {
			if p.cur == pc {
				p.cur = nil
			}
			pc.cancel()
			pc.err = err
			for id, ch := range pc.waiting {
				close(ch)
				delete(pc.waiting, id)
			}
			p.mu.Unlock()
			return
		}
		for _, r := range resp.Results {
			if ch, ok := pc.waiting[r.RequestId]; ok {
				delete(pc.waiting, r.RequestId)
				ch <- r
			}
		}
		p.mu.Unlock()
	}
}

// close half-closes the current call (the sidecar answers what it read, then ends it) and
// refuses new publishes.
func (p *publishStream) close() {
	p.mu.Lock()
	p.closed = true
	pc := p.cur
	p.mu.Unlock()
	if pc != nil {
		pc.sendMu.Lock()
		_ = pc.call.CloseSend()
		pc.sendMu.Unlock()
	}
}
