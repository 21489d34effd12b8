/*
 * The Subscribe frame encoder of sidecar/api/frames.py, in C.
 *
 * It writes exactly the bytes frames.encode_frame writes (tests/unit/test_frames.py checks the two
 * against each other and against the generated classes), in one buffer, reading each record's
 * fields once. frames.py uses it when it is built and SIDECAR_NO_EXTENSIONS is not set; anything
 * this encoder does not expect (a field of another type, an integer past 64 bits) raises
 * TypeError or OverflowError, and frames.py then encodes that frame in Python.
 *
 * Field numbers: SubscribeResponse.deliveries = 1; Delivery: delivery_id 1, idempotency_key 2,
 * topic 3, partition 4, offset 5, key 6, value 7, headers 8, timestamp_ms 9, attempt 10,
 * deadline_ms 11; Header: key 1, value 2.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *s_delivery_ids, *s_idem_key, *s_origin, *s_tp, *s_offset, *s_key, *s_value,
    *s_headers, *s_timestamp_ms, *s_attempt, *s_topic, *s_partition;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 65536;
    while (cap < b->len + more) cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

/* Callers reserve first; these write without checking. */
static inline void put_byte(Buf *b, uint8_t c) { b->data[b->len++] = (char)c; }

static inline void put_varint(Buf *b, uint64_t n) {
    while (n > 0x7F) {
        b->data[b->len++] = (char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    b->data[b->len++] = (char)n;
}

static inline void put_raw(Buf *b, const char *p, Py_ssize_t n) {
    if (n) memcpy(b->data + b->len, p, (size_t)n);
    b->len += n;
}

static inline void put_len_field(Buf *b, uint8_t tag, const char *p, Py_ssize_t n) {
    put_byte(b, tag);
    put_varint(b, (uint64_t)n);
    put_raw(b, p, n);
}

/* A varint field, left out when zero (proto3). */
static inline void put_varint_field(Buf *b, uint8_t tag, uint64_t n) {
    if (n) {
        put_byte(b, tag);
        put_varint(b, n);
    }
}

static inline Py_ssize_t varint_size(uint64_t n) {
    Py_ssize_t size = 1;
    while (n > 0x7F) {
        n >>= 7;
        size++;
    }
    return size;
}

static inline Py_ssize_t len_field_size(Py_ssize_t n) { return 1 + varint_size((uint64_t)n) + n; }

/* An int field as proto3 writes it: negative values as 64-bit two's complement. */
static int as_u64(PyObject *o, uint64_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "an integer field is not an int");
        return -1;
    }
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* A str's UTF-8 bytes (cached on the str by CPython). */
static int as_utf8(PyObject *o, const char **p, Py_ssize_t *n) {
    if (!PyUnicode_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a string field is not a str");
        return -1;
    }
    *p = PyUnicode_AsUTF8AndSize(o, n);
    return *p == NULL ? -1 : 0;
}

static int as_bytes(PyObject *o, const char **p, Py_ssize_t *n) {
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a bytes field is not bytes");
        return -1;
    }
    *p = PyBytes_AS_STRING(o);
    *n = PyBytes_GET_SIZE(o);
    return 0;
}

typedef struct {
    const char *p;
    Py_ssize_t n;
} Span;

/* A header's key and value (an empty span for None), and the size of its Header message body.
   Returns -1 with an exception set when it is not a (str, bytes | None) tuple. */
static Py_ssize_t header_spans(PyObject *h, Span *k, Span *v) {
    if (!PyTuple_Check(h) || PyTuple_GET_SIZE(h) != 2) {
        PyErr_SetString(PyExc_TypeError, "a header is not a (key, value) tuple");
        return -1;
    }
    v->p = NULL;
    v->n = 0;
    if (as_utf8(PyTuple_GET_ITEM(h, 0), &k->p, &k->n) < 0) return -1;
    PyObject *value = PyTuple_GET_ITEM(h, 1);
    if (value != Py_None && as_bytes(value, &v->p, &v->n) < 0) return -1;
    return (k->n ? len_field_size(k->n) : 0) + (v->n ? len_field_size(v->n) : 0);
}

/* Write one Delivery (its length prefix first) for record `rec`. */
static int encode_one(Buf *b, PyObject *rec, const uint8_t *deadline, Py_ssize_t deadline_len) {
    PyObject *ids = NULL, *idem = NULL, *origin = NULL, *tp = NULL, *topic = NULL, *partition = NULL,
             *offset = NULL, *key = NULL, *value = NULL, *headers = NULL, *hseq = NULL, *ts = NULL,
             *attempt = NULL;
    int rc = -1;
    Span did, ik = {NULL, 0}, top = {NULL, 0}, k = {NULL, 0}, v = {NULL, 0};
    uint64_t part = 0, off = 0, tsv = 0, att = 0;
    int has_key = 0;

    ids = PyObject_GetAttr(rec, s_delivery_ids);
    if (ids == NULL) goto done;
    if (!PyList_Check(ids) || PyList_GET_SIZE(ids) == 0) {
        PyErr_SetString(PyExc_TypeError, "delivery_ids is not a non-empty list");
        goto done;
    }
    if (as_utf8(PyList_GET_ITEM(ids, PyList_GET_SIZE(ids) - 1), &did.p, &did.n) < 0) goto done;

    idem = PyObject_GetAttr(rec, s_idem_key);
    if (idem == NULL) goto done;
    if (idem != Py_None && as_utf8(idem, &ik.p, &ik.n) < 0) goto done;

    origin = PyObject_GetAttr(rec, s_origin);
    if (origin == NULL) goto done;
    if (origin == Py_None) {
        tp = PyObject_GetAttr(rec, s_tp);
        if (tp == NULL) goto done;
        if (!PyTuple_Check(tp) || PyTuple_GET_SIZE(tp) != 2) {
            PyErr_SetString(PyExc_TypeError, "tp is not a (topic, partition) tuple");
            goto done;
        }
        topic = Py_NewRef(PyTuple_GET_ITEM(tp, 0));
        partition = Py_NewRef(PyTuple_GET_ITEM(tp, 1));
        offset = PyObject_GetAttr(rec, s_offset);
    } else {
        topic = PyObject_GetAttr(origin, s_topic);
        partition = PyObject_GetAttr(origin, s_partition);
        offset = PyObject_GetAttr(origin, s_offset);
    }
    if (topic == NULL || partition == NULL || offset == NULL) goto done;
    if (as_utf8(topic, &top.p, &top.n) < 0 || as_u64(partition, &part) < 0 || as_u64(offset, &off) < 0)
        goto done;

    key = PyObject_GetAttr(rec, s_key);
    if (key == NULL) goto done;
    if (key != Py_None) {
        if (as_bytes(key, &k.p, &k.n) < 0) goto done;
        has_key = 1;
    }
    value = PyObject_GetAttr(rec, s_value);
    if (value == NULL) goto done;
    if (value != Py_None && as_bytes(value, &v.p, &v.n) < 0) goto done;

    ts = PyObject_GetAttr(rec, s_timestamp_ms);
    attempt = PyObject_GetAttr(rec, s_attempt);
    if (ts == NULL || attempt == NULL || as_u64(ts, &tsv) < 0 || as_u64(attempt, &att) < 0) goto done;

    headers = PyObject_GetAttr(rec, s_headers);
    if (headers == NULL) goto done;
    hseq = PySequence_Fast(headers, "headers is not a sequence");
    if (hseq == NULL) goto done;
    Py_ssize_t nh = PySequence_Fast_GET_SIZE(hseq);
    PyObject **hitems = PySequence_Fast_ITEMS(hseq);

    /* The Delivery's size, headers included: every header is read twice (size, then write),
       both times from the same objects, which this function holds references to, and no Python
       code runs in between. */
    Py_ssize_t size = len_field_size(did.n);
    if (ik.n) size += len_field_size(ik.n);
    if (top.n) size += len_field_size(top.n);
    if (part) size += 1 + varint_size(part);
    if (off) size += 1 + varint_size(off);
    if (has_key) size += len_field_size(k.n);
    if (v.n) size += len_field_size(v.n);
    for (Py_ssize_t i = 0; i < nh; i++) {
        Span hk, hv;
        Py_ssize_t body = header_spans(hitems[i], &hk, &hv);
        if (body < 0) goto done;
        size += len_field_size(body);
    }
    if (tsv) size += 1 + varint_size(tsv);
    if (att) size += 1 + varint_size(att);
    size += deadline_len;

    if (buf_reserve(b, 1 + varint_size((uint64_t)size) + size) < 0) goto done;
    put_byte(b, 0x0a);
    put_varint(b, (uint64_t)size);
    put_len_field(b, 0x0a, did.p, did.n);
    if (ik.n) put_len_field(b, 0x12, ik.p, ik.n);
    if (top.n) put_len_field(b, 0x1a, top.p, top.n);
    put_varint_field(b, 0x20, part);
    put_varint_field(b, 0x28, off);
    if (has_key) put_len_field(b, 0x32, k.p, k.n);
    if (v.n) put_len_field(b, 0x3a, v.p, v.n);
    for (Py_ssize_t i = 0; i < nh; i++) {
        Span hk, hv;
        Py_ssize_t body = header_spans(hitems[i], &hk, &hv); /* succeeded in the size pass */
        put_byte(b, 0x42);
        put_varint(b, (uint64_t)body);
        if (hk.n) put_len_field(b, 0x0a, hk.p, hk.n);
        if (hv.n) put_len_field(b, 0x12, hv.p, hv.n);
    }
    put_varint_field(b, 0x48, tsv);
    put_varint_field(b, 0x50, att);
    put_raw(b, (const char *)deadline, deadline_len);
    rc = 0;

done:
    Py_XDECREF(ids);
    Py_XDECREF(idem);
    Py_XDECREF(origin);
    Py_XDECREF(tp);
    Py_XDECREF(topic);
    Py_XDECREF(partition);
    Py_XDECREF(offset);
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_XDECREF(headers);
    Py_XDECREF(hseq);
    Py_XDECREF(ts);
    Py_XDECREF(attempt);
    return rc;
}

PyDoc_STRVAR(encode_frame_doc,
             "encode_frame(batch, deadline_ms, /)\n--\n\n"
             "A serialized SubscribeResponse with one Delivery per record (see frames.encode_frame).");

static PyObject *encode_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_frame(batch, deadline_ms) takes two arguments");
        return NULL;
    }
    uint64_t deadline_ms;
    if (as_u64(args[1], &deadline_ms) < 0) return NULL;
    uint8_t deadline[11];
    Py_ssize_t deadline_len = 0;
    if (deadline_ms) {
        Buf d = {(char *)deadline, 0, sizeof deadline};
        put_byte(&d, 0x58);
        put_varint(&d, deadline_ms);
        deadline_len = d.len;
    }
    PyObject *seq = PySequence_Fast(args[0], "batch is not a sequence");
    if (seq == NULL) return NULL;
    Buf b = {NULL, 0, 0};
    PyObject *out = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (encode_one(&b, items[i], deadline, deadline_len) < 0) goto done;
    }
    out = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
done:
    PyMem_Free(b.data);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL, encode_frame_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_cframes",
    .m_doc = "The C Subscribe frame encoder (see sidecar/api/frames.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__cframes(void) {
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_delivery_ids, "delivery_ids");
    INTERN(s_idem_key, "idem_key");
    INTERN(s_origin, "origin");
    INTERN(s_tp, "tp");
    INTERN(s_offset, "offset");
    INTERN(s_key, "key");
    INTERN(s_value, "value");
    INTERN(s_headers, "headers");
    INTERN(s_timestamp_ms, "timestamp_ms");
    INTERN(s_attempt, "attempt");
    INTERN(s_topic, "topic");
    INTERN(s_partition, "partition");
#undef INTERN
    return PyModule_Create(&module_def);
}
