package dedup

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

// fakeSidecar answers like the sidecar would, and records what it was asked.
type fakeSidecar struct {
	dedupv1.UnimplementedDedupServiceServer

	mu        sync.Mutex
	ackCalls  [][]string
	ackErr    error
	ackFails  int // calls that fail with UNAVAILABLE before the rest answer
	auth      []string
	published []*dedupv1.PublishRequest
	frames    []*dedupv1.SubscribeResponse
}

func (f *fakeSidecar) Ack(ctx context.Context, req *dedupv1.AckRequest) (*dedupv1.AckResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	md, _ := metadata.FromIncomingContext(ctx)
	f.auth = append(f.auth, md.Get("authorization")...)
	f.ackCalls = append(f.ackCalls, req.DeliveryIds)
	if f.ackErr != nil {
		return nil, f.ackErr
	}
	if f.ackFails > 0 {
		f.ackFails--
		return nil, status.Error(codes.Unavailable, "the dedup store is unreachable")
	}
	out := &dedupv1.AckResponse{}
	for _, id := range req.DeliveryIds {
		if id == "unknown" {
			out.Results = append(out.Results, AckUnknown)
		} else {
			out.Results = append(out.Results, AckOK)
		}
	}
	return out, nil
}

func (f *fakeSidecar) Subscribe(req *dedupv1.SubscribeRequest, stream grpc.ServerStreamingServer[dedupv1.SubscribeResponse]) error {
	if req.MaxInFlight != 7 {
		return status.Error(codes.InvalidArgument, "expected max_in_flight 7")
	}
	for _, frame := range f.frames {
		if err := stream.Send(frame); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeSidecar) PublishBatch(_ context.Context, req *dedupv1.PublishBatchRequest) (*dedupv1.PublishBatchResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &dedupv1.PublishBatchResponse{}
	for i, e := range req.Entries {
		f.published = append(f.published, e)
		if e.Topic == "missing" {
			out.Results = append(out.Results, &dedupv1.PublishBatchResult{
				Code: int32(codes.NotFound), Message: "topic 'missing' does not exist",
			})
			continue
		}
		out.Results = append(out.Results, &dedupv1.PublishBatchResult{Response: &dedupv1.PublishResponse{
			IdempotencyKey: e.IdempotencyKey, Topic: e.Topic, Partition: 1, Offset: int64(100 + i),
		}})
	}
	return out, nil
}

func (f *fakeSidecar) StreamingPublish(stream grpc.BidiStreamingServer[dedupv1.StreamingPublishRequest, dedupv1.StreamingPublishResponse]) error {
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		f.mu.Lock()
		f.published = append(f.published, req.Publish)
		n := len(f.published)
		f.mu.Unlock()
		r := &dedupv1.StreamingPublishResult{RequestId: req.RequestId}
		if req.Publish.Topic == "missing" {
			r.Code, r.Message = int32(codes.NotFound), "topic 'missing' does not exist"
		} else {
			r.Response = &dedupv1.PublishResponse{IdempotencyKey: req.Publish.IdempotencyKey, Topic: req.Publish.Topic, Offset: int64(n)}
		}
		if err := stream.Send(&dedupv1.StreamingPublishResponse{Results: []*dedupv1.StreamingPublishResult{r}}); err != nil {
			return err
		}
	}
}

func (f *fakeSidecar) calls() [][]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([][]string(nil), f.ackCalls...)
}

func (f *fakeSidecar) authorization() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.auth...)
}

func (f *fakeSidecar) requests() []*dedupv1.PublishRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*dedupv1.PublishRequest(nil), f.published...)
}

func start(t *testing.T, fake *fakeSidecar, opts Options) *Client {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	dedupv1.RegisterDedupServiceServer(srv, fake)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	opts.DialOptions = append(opts.DialOptions, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
		return lis.DialContext(ctx)
	}))
	c, err := New("passthrough:///sidecar", opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// readAll reads a stream to its end.
func readAll(t *testing.T, s *Stream) []*Message {
	t.Helper()
	var got []*Message
	for {
		frame, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return got
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, frame...)
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestAcksAreGatheredIntoCallsOfAtMostMaxIDs(t *testing.T) {
	fake := &fakeSidecar{}
	c := start(t, fake, Options{AckLinger: time.Hour, AckMaxIDs: 100})
	var pending []*PendingAck
	for i := 0; i < 250; i++ {
		m := &Message{Delivery: &dedupv1.Delivery{DeliveryId: DeriveKey("d", i)}, client: c}
		pending = append(pending, m.Ack())
	}
	pending = append(pending, (&Message{Delivery: &dedupv1.Delivery{DeliveryId: "unknown"}, client: c}).Ack())
	// Two calls went at 100 ids each; the last 51 wait for the (hour-long) linger or a flush.
	if err := c.FlushAcks(ctx(t)); err != nil {
		t.Fatal(err)
	}
	sizes := map[int]int{}
	for _, call := range fake.calls() {
		sizes[len(call)]++
	}
	if len(fake.calls()) != 3 || sizes[100] != 2 || sizes[51] != 1 {
		t.Fatalf("want calls of 100, 100 and 51 ids, got sizes %v", sizes)
	}
	for i, a := range pending {
		got, err := a.Wait(ctx(t))
		want := AckOK
		if i == 250 {
			want = AckUnknown
		}
		if err != nil || got != want {
			t.Fatalf("ack %d: got %v, %v; want %v", i, got, err, want)
		}
	}
}

func TestAcksWithinTheLingerShareOneCall(t *testing.T) {
	fake := &fakeSidecar{}
	c := start(t, fake, Options{AckLinger: 20 * time.Millisecond, Token: "s3cret"})
	var pending []*PendingAck
	for i := 0; i < 5; i++ {
		pending = append(pending, (&Message{Delivery: &dedupv1.Delivery{DeliveryId: DeriveKey("d", i)}, client: c}).Ack())
	}
	for _, a := range pending {
		if r, err := a.Wait(ctx(t)); err != nil || r != AckOK {
			t.Fatalf("got %v, %v", r, err)
		}
	}
	if n := len(fake.calls()); n != 1 {
		t.Fatalf("want one Ack call, got %d", n)
	}
	if auth := fake.authorization(); len(auth) != 1 || auth[0] != "Bearer s3cret" {
		t.Fatalf("authorization metadata: %v", auth)
	}
}

func TestAFailedAckCallFailsEachOfItsAcksWithTheStatus(t *testing.T) {
	fake := &fakeSidecar{ackErr: status.Error(codes.Unavailable, "store unavailable")}
	c := start(t, fake, Options{AckRetry: 300 * time.Millisecond})
	a := (&Message{Delivery: &dedupv1.Delivery{DeliveryId: "x"}, client: c}).Ack()
	_, err := a.Wait(ctx(t))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("want UNAVAILABLE through the wrapped error, got %v", err)
	}
	if n := len(fake.calls()); n < 2 {
		t.Fatalf("the UNAVAILABLE ack was not retried within AckRetry: %d calls", n)
	}
}

func TestAnAckThatFailsWithUnavailableIsRetriedUntilItLands(t *testing.T) {
	for _, plain := range []bool{false, true} {
		fake := &fakeSidecar{ackFails: 3}
		c := start(t, fake, Options{PlainAcks: plain})
		deadline := time.Now().Add(time.Minute).UnixMilli()
		a := (&Message{Delivery: &dedupv1.Delivery{DeliveryId: "x", DeadlineMs: deadline}, client: c}).Ack()
		r, err := a.Wait(ctx(t))
		if err != nil || r != AckOK {
			t.Fatalf("plain=%v: want OK after the retries, got %v, %v", plain, r, err)
		}
		if n := len(fake.calls()); n != 4 {
			t.Fatalf("plain=%v: want 3 failed calls and 1 that landed, got %d", plain, n)
		}
	}
}

func TestAnAckIsNotRetriedPastTheMessagesDeadline(t *testing.T) {
	fake := &fakeSidecar{ackErr: status.Error(codes.Unavailable, "store unavailable")}
	c := start(t, fake, Options{PlainAcks: true})
	deadline := time.Now().Add(300 * time.Millisecond)
	a := (&Message{Delivery: &dedupv1.Delivery{DeliveryId: "x", DeadlineMs: deadline.UnixMilli()}, client: c}).Ack()
	_, err := a.Wait(ctx(t))
	if status.Code(err) != codes.Unavailable && status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("want the failure, got %v", err)
	}
	if late := time.Since(deadline); late > 500*time.Millisecond {
		t.Fatalf("retried %v past the message's deadline", late)
	}
}

func TestStreamingPublishesShareOneStreamAndEachGetsItsAnswer(t *testing.T) {
	fake := &fakeSidecar{}
	c := start(t, fake, Options{Streaming: true})
	var wg sync.WaitGroup
	results := make([]PublishResult, 50)
	errs := make([]error, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "t"
			if i == 7 {
				topic = "missing"
			}
			results[i], errs[i] = c.Publish(ctx(t), Record{Topic: topic, Value: []byte("v"), IdempotencyKey: DeriveKey("k", i)})
		}()
	}
	wg.Wait()
	for i := range 50 {
		if i == 7 {
			var perr *PublishError
			if !errors.As(errs[i], &perr) || status.Code(errs[i]) != codes.NotFound {
				t.Fatalf("record 7: want NOT_FOUND as a *PublishError, got %v", errs[i])
			}
			continue
		}
		if errs[i] != nil || results[i].IdempotencyKey != DeriveKey("k", i) {
			t.Fatalf("record %d: %+v, %v", i, results[i], errs[i])
		}
	}
	if n := len(fake.requests()); n != 50 {
		t.Fatalf("want 50 records on the stream, got %d", n)
	}
}

func TestPlainAcksMakeOneCallEach(t *testing.T) {
	fake := &fakeSidecar{}
	c := start(t, fake, Options{PlainAcks: true})
	for i := 0; i < 3; i++ {
		a := (&Message{Delivery: &dedupv1.Delivery{DeliveryId: DeriveKey("d", i)}, client: c}).Ack()
		if r, err := a.Wait(ctx(t)); err != nil || r != AckOK {
			t.Fatalf("got %v, %v", r, err)
		}
	}
	if n := len(fake.calls()); n != 3 {
		t.Fatalf("want 3 calls, got %d", n)
	}
}

func TestStreamYieldsFramesThenEOF(t *testing.T) {
	fake := &fakeSidecar{frames: []*dedupv1.SubscribeResponse{
		{Deliveries: []*dedupv1.Delivery{{DeliveryId: "a", Value: []byte("1")}, {DeliveryId: "b"}}},
		{Deliveries: []*dedupv1.Delivery{{DeliveryId: "c", Key: []byte{}}}},
	}}
	c := start(t, fake, Options{})
	s, err := c.Subscribe(ctx(t), SubscribeOptions{MaxInFlight: 7})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ids []string
	for _, m := range readAll(t, s) {
		ids = append(ids, m.DeliveryId)
	}
	if len(ids) != 3 || ids[0] != "a" || ids[2] != "c" {
		t.Fatalf("got %v", ids)
	}

	bad, err := c.Subscribe(ctx(t), SubscribeOptions{MaxInFlight: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if _, err := bad.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("want the stream's INVALID_ARGUMENT, got %v", err)
	}
}

func TestPublishBatchGivesEachEntryItsOutcome(t *testing.T) {
	fake := &fakeSidecar{}
	c := start(t, fake, Options{})
	p := int32(2)
	out, err := c.PublishBatch(ctx(t), []Record{
		{Topic: "orders", Value: []byte("a"), IdempotencyKey: "k1", Partition: &p},
		{Topic: "missing", Value: []byte("b"), IdempotencyKey: "k2"},
		{Topic: "orders", Value: []byte("c"), Key: []byte("user-1"), IdempotencyKey: "k3"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if out[0].Err != nil || out[0].Result.Offset != 100 || out[0].Result.IdempotencyKey != "k1" {
		t.Fatalf("entry 0: %+v", out[0])
	}
	var pe *PublishError
	if !errors.As(out[1].Err, &pe) || pe.Code != codes.NotFound || status.Code(out[1].Err) != codes.NotFound {
		t.Fatalf("entry 1: want a NOT_FOUND PublishError, got %v", out[1].Err)
	}
	if out[2].Err != nil || out[2].Result.Offset != 102 {
		t.Fatalf("entry 2: %+v", out[2])
	}
	sent := fake.requests()
	if sent[0].GetPartition() != 2 || sent[1].Partition != nil || sent[0].Key != nil || string(sent[2].Key) != "user-1" {
		t.Fatalf("optional fields not carried as given: %v", sent)
	}
}

func TestDeriveKeyMatchesThePythonClient(t *testing.T) {
	if got := DeriveKey("order-7", 2); got != "order-7/2" {
		t.Fatal(got)
	}
}
