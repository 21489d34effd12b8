package dedup

import (
	"context"
	"fmt"
	"strconv"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kafka-dedup-sidecar/clients/go/dedupv1"
)

// Record is one record to publish.
type Record struct {
	Topic string
	// Key is the record key; nil publishes a keyless record (spread by the partitioner).
	Key   []byte
	Value []byte
	// Headers travel with the record; the sidecar adds the idempotency header.
	Headers []*dedupv1.Header
	// IdempotencyKey names the record: the same key is written to Kafka once. At most 255
	// bytes of UTF-8. Empty: the sidecar generates a unique one (and cannot dedup retries).
	IdempotencyKey string
	// Partition picks the partition; nil lets the producer's partitioner choose.
	Partition *int32
}

// PublishResult says where the record is in Kafka.
type PublishResult struct {
	IdempotencyKey string
	Topic          string
	Partition      int32
	Offset         int64
	// Duplicate: the key was published before; Partition and Offset are the first write's.
	Duplicate bool
}

// PublishError is one PublishBatch entry's failure: its gRPC status code and the sidecar's
// message, which names the setting or the input to change. status.Code(err) reads the code.
type PublishError struct {
	Code    codes.Code
	Message string
}

func (e *PublishError) Error() string {
	return fmt.Sprintf("dedup: publish failed: %s: %s", e.Code, e.Message)
}

// GRPCStatus lets status.Code and status.FromError read the entry's status.
func (e *PublishError) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

// PublishOutcome is one PublishBatch entry's answer: Err is nil or a *PublishError.
type PublishOutcome struct {
	Result PublishResult
	Err    error
}

// Publish writes one record through the sidecar's idempotent producer and waits for Kafka's
// acknowledgement. The error is the call's gRPC status error: INVALID_ARGUMENT for a bad
// record, ALREADY_EXISTS for a key published before with another payload, DEADLINE_EXCEEDED
// or UNAVAILABLE when the outcome is unknown (retry with the same idempotency key).
//
// With Options.Streaming the record goes on the worker's shared StreamingPublish call; a
// failure of the record is then a *PublishError (status.Code reads it as well), and a stream
// that ends before the answer gives UNAVAILABLE (retry with the same idempotency key).
func (c *Client) Publish(ctx context.Context, r Record) (PublishResult, error) {
	w := c.next()
	if c.opts.Streaming {
		answer, err := w.pub.publish(ctx, r.request())
		if err != nil {
			return PublishResult{}, err
		}
		if code := codes.Code(answer.Code); code != codes.OK {
			return PublishResult{}, &PublishError{Code: code, Message: answer.Message}
		}
		return result(answer.Response), nil
	}
	resp, err := w.stub.Publish(ctx, r.request())
	if err != nil {
		return PublishResult{}, err
	}
	return result(resp), nil
}

// PublishBatch writes many records in one call. A non-nil error means the call failed as a
// whole (nothing is known about any entry: retry with the same keys); otherwise every entry
// has its own outcome, in order.
func (c *Client) PublishBatch(ctx context.Context, records []Record) ([]PublishOutcome, error) {
	req := &dedupv1.PublishBatchRequest{Entries: make([]*dedupv1.PublishRequest, len(records))}
	for i := range records {
		req.Entries[i] = records[i].request()
	}
	resp, err := c.next().stub.PublishBatch(ctx, req)
	if err != nil {
		return nil, err
	}
	if len(resp.Results) != len(records) {
		return nil, status.Errorf(codes.Internal, "dedup: the sidecar answered %d results for %d records",
			len(resp.Results), len(records))
	}
	out := make([]PublishOutcome, len(records))
	for i, r := range resp.Results {
		if code := codes.Code(r.Code); code != codes.OK {
			out[i].Err = &PublishError{Code: code, Message: r.Message}
		} else {
			out[i].Result = result(r.Response)
		}
	}
	return out, nil
}

func (r *Record) request() *dedupv1.PublishRequest {
	return &dedupv1.PublishRequest{
		Topic:          r.Topic,
		Key:            r.Key,
		Value:          r.Value,
		Headers:        r.Headers,
		IdempotencyKey: r.IdempotencyKey,
		Partition:      r.Partition,
	}
}

func result(r *dedupv1.PublishResponse) PublishResult {
	return PublishResult{
		IdempotencyKey: r.GetIdempotencyKey(),
		Topic:          r.GetTopic(),
		Partition:      r.GetPartition(),
		Offset:         r.GetOffset(),
		Duplicate:      r.GetDuplicate(),
	}
}

// DeriveKey is the idempotency key of the index-th record published while handling the
// delivery whose key is inputKey. A redelivered input then republishes its outputs under the
// same keys, and the sidecar writes each of them once.
func DeriveKey(inputKey string, index int) string {
	return inputKey + "/" + strconv.Itoa(index)
}
