// Command roundtrip publishes records through a sidecar, publishes some of them again, then
// consumes and acks them all: the whole client surface against a real sidecar. It prints one
// JSON line of counts; tests/integration/test_other_clients.py checks them against Kafka.
//
//	go run ./examples/roundtrip -target 127.0.0.1:50051 -topic orders -n 200
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/kafka-dedup-sidecar/clients/go/dedup"
)

type summary struct {
	Published  int `json:"published"`
	Duplicates int `json:"duplicates"`
	Received   int `json:"received"`
	Acked      int `json:"acked"`
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the sidecar's server.listen")
	topic := flag.String("topic", "", "a topic the sidecar consumes (kafka.topics)")
	n := flag.Int("n", 100, "records to publish")
	again := flag.Int("again", 10, "records to publish a second time (duplicates)")
	token := flag.String("token", "", "the sidecar's server.auth_token, if set")
	streaming := flag.Bool("streaming", false, "publish one record per Publish, on a StreamingPublish call (Options.Streaming)")
	timeout := flag.Duration("timeout", 60*time.Second, "give up after this long")
	var tlsOpts dedup.TLSOptions
	flag.StringVar(&tlsOpts.CAFile, "tls-ca", "", "dial with TLS, trusting this CA (PEM)")
	flag.StringVar(&tlsOpts.CertFile, "tls-cert", "", "client certificate for mTLS (PEM)")
	flag.StringVar(&tlsOpts.KeyFile, "tls-key", "", "client key for mTLS (PEM)")
	flag.StringVar(&tlsOpts.ServerName, "tls-server-name", "", "name to check the sidecar's certificate against")
	flag.Parse()
	if *topic == "" {
		fmt.Fprintln(os.Stderr, "roundtrip: -topic is required")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	opts := dedup.Options{Token: *token, Streaming: *streaming}
	if tlsOpts.CAFile != "" || tlsOpts.CertFile != "" {
		opts.TLS = &tlsOpts
	}
	out, err := run(ctx, *target, *topic, *n, *again, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "roundtrip:", err)
		os.Exit(1)
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

func run(ctx context.Context, target, topic string, n, again int, opts dedup.Options) (summary, error) {
	var out summary
	c, err := dedup.New(target, opts)
	if err != nil {
		return out, err
	}
	defer c.Close(context.Background())

	records := make([]dedup.Record, n)
	for i := range records {
		records[i] = dedup.Record{
			Topic: topic, Value: []byte("value-" + strconv.Itoa(i)), IdempotencyKey: "go-" + strconv.Itoa(i),
		}
	}
	for _, batch := range [][]dedup.Record{records, records[:again]} {
		outcomes, err := publish(ctx, c, batch, opts.Streaming)
		if err != nil {
			return out, fmt.Errorf("PublishBatch: %w", err)
		}
		for i, o := range outcomes {
			if o.Err != nil {
				return out, fmt.Errorf("record %d: %w", i, o.Err)
			}
			if o.Result.Duplicate {
				out.Duplicates++
			} else {
				out.Published++
			}
		}
	}

	stream, err := c.Subscribe(ctx, dedup.SubscribeOptions{MaxInFlight: 50})
	if err != nil {
		return out, err
	}
	defer stream.Close()
	seen := map[string]bool{}
	var acks []*dedup.PendingAck
	for len(seen) < n {
		frame, err := stream.Recv()
		if err != nil {
			return out, fmt.Errorf("after %d records: %w", len(seen), err)
		}
		for _, m := range frame {
			out.Received++
			seen[m.IdempotencyKey] = true
			acks = append(acks, m.Ack())
		}
	}
	if err := c.FlushAcks(ctx); err != nil {
		return out, err
	}
	for _, a := range acks {
		r, err := a.Wait(ctx)
		if err != nil {
			return out, err
		}
		if r == dedup.AckOK {
			out.Acked++
		}
	}
	return out, nil
}

// publish writes the records in one PublishBatch call or, streaming, with one Publish each from
// concurrent goroutines (sharing the client's StreamingPublish call).
func publish(ctx context.Context, c *dedup.Client, records []dedup.Record, streaming bool) ([]dedup.PublishOutcome, error) {
	if !streaming {
		return c.PublishBatch(ctx, records)
	}
	out := make([]dedup.PublishOutcome, len(records))
	var wg sync.WaitGroup
	for i := range records {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i].Result, out[i].Err = c.Publish(ctx, records[i])
		}()
	}
	wg.Wait()
	return out, nil
}
