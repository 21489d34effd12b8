// Command consume reads n records from a sidecar and acks each one, as an app that applies
// nothing would: the Go client's share of the consume path. bench/scenarios/consume.py runs it for its
// "Go client" row. It prints one JSON line: the records read and the seconds from the first
// record until the last ack was answered.
//
//	go run ./examples/consume -target 127.0.0.1:50051 -n 200000
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/kafka-dedup-sidecar/clients/go/dedup"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the sidecar's server.listen")
	n := flag.Int("n", 100000, "records to read")
	inFlight := flag.Int("max-in-flight", 5000, "the stream's max_in_flight")
	maxIDs := flag.Int("ack-max-ids", 2000, "most ids per gathered Ack call")
	linger := flag.Duration("ack-linger", 2*time.Millisecond, "how long acks are gathered")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	records, seconds, err := run(ctx, *target, *n, int32(*inFlight), *maxIDs, *linger)
	if err != nil {
		fmt.Fprintln(os.Stderr, "consume:", err)
		os.Exit(1)
	}
	line, _ := json.Marshal(map[string]any{"records": records, "seconds": seconds})
	fmt.Println(string(line))
}

func run(ctx context.Context, target string, n int, inFlight int32, maxIDs int, linger time.Duration) (int, float64, error) {
	c, err := dedup.New(target, dedup.Options{AckMaxIDs: maxIDs, AckLinger: linger})
	if err != nil {
		return 0, 0, err
	}
	defer c.Close(context.Background())
	stream, err := c.Subscribe(ctx, dedup.SubscribeOptions{MaxInFlight: inFlight})
	if err != nil {
		return 0, 0, err
	}
	defer stream.Close()
	var start time.Time
	count := 0
	acks := make([]*dedup.PendingAck, 0, n)
	for count < n {
		frame, err := stream.Recv()
		if err != nil {
			return count, 0, fmt.Errorf("after %d records: %w", count, err)
		}
		if start.IsZero() {
			start = time.Now()
		}
		for _, m := range frame {
			acks = append(acks, m.Ack())
		}
		count += len(frame)
	}
	if err := c.FlushAcks(ctx); err != nil {
		return count, 0, err
	}
	seconds := time.Since(start).Seconds()
	for _, a := range acks { // a run whose acks failed measures nothing
		if r, err := a.Wait(ctx); err != nil || r != dedup.AckOK {
			return count, 0, fmt.Errorf("an ack was answered %v, %v", r, err)
		}
	}
	return count, seconds, nil
}
