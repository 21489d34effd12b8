package dedup

import (
	"context"
	"errors"
	"net"
	"sort"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/test/bufconn"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

// workerFake is one worker of a sidecar with server.workers = 2: it lists both workers, and
// delivers frames whose ids carry its own prefix.
type workerFake struct {
	fakeSidecar
	index int32
}

func (f *workerFake) ListWorkers(context.Context, *dedupv1.ListWorkersRequest) (*dedupv1.ListWorkersResponse, error) {
	return &dedupv1.ListWorkersResponse{
		Workers:    []*dedupv1.Worker{{Index: 0, Port: 7000}, {Index: 1, Port: 7001}},
		ThisWorker: f.index,
	}, nil
}

func TestAClientOfTwoWorkersMergesTheirStreamsAndAcksEachOnItsWorker(t *testing.T) {
	fakes := []*workerFake{{index: 0}, {index: 1}}
	listeners := map[string]*bufconn.Listener{}
	for i, f := range fakes {
		prefix := []string{"aaaaaaaa", "bbbbbbbb"}[i]
		f.frames = []*dedupv1.SubscribeResponse{
			{Deliveries: []*dedupv1.Delivery{{DeliveryId: prefix + ".1"}, {DeliveryId: prefix + ".2"}}},
		}
		lis := bufconn.Listen(1 << 20)
		srv := grpc.NewServer()
		dedupv1.RegisterDedupServiceServer(srv, f)
		go func() { _ = srv.Serve(lis) }()
		t.Cleanup(srv.Stop)
		listeners[[]string{"7000", "7001"}[i]] = lis
	}
	dialer := grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		lis, ok := listeners[addr[strings.LastIndexByte(addr, ':')+1:]]
		if !ok {
			return nil, errors.New("no worker at " + addr)
		}
		return lis.DialContext(ctx)
	})
	c, err := New("passthrough:///sidecar:7000", Options{DialOptions: []grpc.DialOption{dialer}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	// MaxInFlight 14 is shared out: 7 a worker, which the fakes insist on.
	s, err := c.Subscribe(ctx(t), SubscribeOptions{MaxInFlight: 14})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ids []string
	for _, m := range readAll(t, s) {
		ids = append(ids, m.DeliveryId)
		m.Ack()
	}
	sort.Strings(ids)
	if strings.Join(ids, " ") != "aaaaaaaa.1 aaaaaaaa.2 bbbbbbbb.1 bbbbbbbb.2" {
		t.Fatalf("want both workers' deliveries, got %v", ids)
	}
	if err := c.FlushAcks(ctx(t)); err != nil {
		t.Fatal(err)
	}
	// AckMany of ids from both workers: one call to each, with its own ids.
	results, err := c.AckMany(ctx(t), []string{"bbbbbbbb.9", "aaaaaaaa.9"})
	if err != nil || len(results) != 2 {
		t.Fatal(results, err)
	}
	for i, f := range fakes {
		prefix := []string{"aaaaaaaa", "bbbbbbbb"}[i]
		for _, call := range f.calls() {
			for _, id := range call {
				if !strings.HasPrefix(id, prefix) {
					t.Fatalf("worker %d was asked to ack %s", i, id)
				}
			}
		}
		if n := len(f.calls()); n != 2 {
			t.Fatalf("worker %d got %d Ack calls, want 2 (the gathered acks, then AckMany's)", i, n)
		}
	}
}
