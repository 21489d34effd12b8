package dedup_test

import (
	"context"
	"errors"
	"io"
	"log"

	"github.com/kafka-dedup-sidecar/clients/go/dedup"
)

// Consume, apply, ack; and publish each input's outputs under keys derived from it, so that a
// redelivered input publishes nothing twice.
func Example() {
	ctx := context.Background()
	c, err := dedup.New("127.0.0.1:50051", dedup.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	stream, err := c.Subscribe(ctx, dedup.SubscribeOptions{Topics: []string{"orders"}, MaxInFlight: 1000})
	if err != nil {
		log.Fatal(err)
	}
	defer stream.Close()
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			log.Fatal(err) // for example INVALID_ARGUMENT: "orders" is not in the sidecar's kafka.topics
		}
		for _, m := range frame {
			_, err := c.Publish(ctx, dedup.Record{
				Topic:          "invoices",
				Value:          m.Value,
				IdempotencyKey: dedup.DeriveKey(m.IdempotencyKey, 0),
			})
			if err != nil {
				// Not acked: the sidecar redelivers it after its deadline, and the retry
				// publishes under the same key.
				log.Print(err)
				continue
			}
			m.Ack()
		}
	}
}
