// Command queueworker is an app behind a sidecar in queue mode (kafka.group_type = "share"):
// run one next to each of several sidecars of the same share group and they share the records
// of even a single partition. Nothing in the client changes for queue mode; what the app must
// know is that a record is lent under a lock, so it answers within the ack deadline, Nacks what
// it cannot do now (the record goes back to the group, to any member) and dead-letters what it
// can never do.
//
//	go run ./examples/queueworker -target 127.0.0.1:50051
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/kafka-dedup-sidecar/clients/go/dedup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the sidecar's server.listen")
	work := flag.Duration("work", 5*time.Millisecond, "time each job takes")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *target, *work); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "queueworker:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, target string, work time.Duration) error {
	c, err := dedup.New(target, dedup.Options{})
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	// No Ordering: a share group has none, and the sidecar refuses "key" or "partition" in
	// queue mode with FAILED_PRECONDITION.
	stream, err := c.Subscribe(ctx, dedup.SubscribeOptions{MaxInFlight: 10})
	if err != nil {
		return err
	}
	defer stream.Close()
	done := 0
	for {
		frame, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("after %d jobs: %w", done, err)
		}
		for _, m := range frame {
			if len(m.Value) == 0 { // a job that can never succeed: written to the DLQ, then rejected
				if _, err := m.Nack(ctx, dedup.NackOptions{DeadLetter: true, Reason: "empty job"}); err != nil {
					return err
				}
				continue
			}
			if work > 5*time.Second { // a long job: ask for more time first
				_, err := c.ExtendDeadline(ctx, []string{m.DeliveryId}, int32(work/time.Second)+1)
				if status.Code(err) == codes.FailedPrecondition {
					// Past the record's share lock (the message names the group setting):
					// give it back to the group now rather than let the lock run out.
					now := time.Duration(0)
					if _, err := m.Nack(ctx, dedup.NackOptions{Delay: &now}); err != nil {
						return err
					}
					continue
				}
				if err != nil {
					return err
				}
			}
			time.Sleep(work) // the side effect
			m.Ack()          // the done mark, then ACCEPT
			done++
		}
	}
}
