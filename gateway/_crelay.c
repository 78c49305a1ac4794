/* gateway._crelay: the per-token half of a streamed response, relayed by a C thread.
 *
 * Why: with uvloop every upstream read of a stream (one token, at a paced engine) costs a
 * trip through the event loop and the interpreter, ~9 us more than nginx per token (see
 * docs/benchmarks.md, "Gateway overhead"). Once the gateway has committed a 200 stream, the
 * rest of the response needs no Python: de-chunk the upstream body, find the usage event, re-
 * chunk, write. A Relay owns one thread with its own epoll set and does exactly that, for every
 * stream handed to it, the way a C proxy does.
 *
 * Contract with the Python side (gateway/offload.py, gateway/relay.py):
 * - start() is called with the GIL, on the loop thread, after the upstream head was parsed and
 *   while both uvloop transports have reading paused and an empty write buffer, and nothing of
 *   the response has been written to the client: the relay gets the client's response head and
 *   writes it with the first data (or the end). The file descriptors stay owned by those
 *   transports: the relay never closes them, and Python must not close, read or write them
 *   until the stream is collected.
 * - start() processes the body bytes that came with the head at once (the first token leaves
 *   without waiting for the thread), then queues the stream to the relay thread and wakes it.
 *   Only the relay thread touches its epoll set (every epoll_ctl) and the list of active
 *   streams, and while it runs it alone queues finished streams and writes the completion
 *   eventfd (start() does only once the thread is gone); the loop thread writes the wake-up
 *   eventfd. The two threads share only the incoming and finished queues and the flags, under
 *   one mutex.
 * - Once start() returned, the stream comes back through collect() exactly once: the completion
 *   eventfd (fileno()) becomes readable and collect() returns (token, outcome, pending, usage,
 *   data_events, first_byte, reusable, head_sent) tuples. outcome "done": the whole response was
 *   written, last chunk included. "closed" / "protocol" / "timeout" / "internal": the upstream
 *   (or the relay) failed; ``pending`` holds bytes not yet written to the client, and
 *   ``head_sent`` false means nothing at all reached the client (the head is Python's again: it
 *   may retry elsewhere or answer with an error status). "client_gone", "client_timeout",
 *   "cancelled": the client is to be cut.
 * - The relay thread never touches a Python object and runs with every signal blocked. A
 *   stream is freed only by collect(), and a finished stream is queued only after the epoll
 *   batch that finished it, so no event of that batch can point at freed memory.
 * - Every system call's result is checked; one that fails where it cannot fail in a correct
 *   program is counted (syscall_errors(), which the tests assert is zero) and ends its stream
 *   with "internal". A failing epoll_wait ends every stream and the thread; start() then raises.
 *
 * Semantics match gateway/sse.py (SseScanner) and the Python relay: one client write per upstream
 * read, events held until complete (at most MAX_EVENT bytes, then everything passes through),
 * usage events read, and cut when the gateway asked for usage itself and the event has no choices.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENT (1u << 20)
#define READ_SIZE 65536
#define MAX_EVENTS 256

/* ---------------------------------------------------------------------------------------- */
/* growable byte buffer                                                                      */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(buf_t *b, const char *s, size_t n) {
    if (n == 0) return 0;
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* sans-IO: chunked transfer decoding                                                        */

enum { CH_SIZE, CH_SIZE_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_TRAILER, CH_TRAILER_LINE,
       CH_TRAILER_LF, CH_END_LF, CH_DONE };

typedef struct {
    int state;
    int digits;
    uint64_t remain;
} chunker_t;

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decode ``in`` into ``out``; ``*used`` is how much of ``in`` belongs to the message. Returns
 * 0, -1 on a framing error, -2 when out of memory. Message complete: c->state == CH_DONE. */
static int dechunk(chunker_t *c, const char *in, size_t n, buf_t *out, size_t *used) {
    size_t i = 0;
    while (i < n && c->state != CH_DONE) {
        char ch = in[i];
        switch (c->state) {
        case CH_SIZE: {
            int v = hexval(ch);
            if (v >= 0) {
                if (++c->digits > 15) return -1;
                c->remain = (c->remain << 4) | (uint64_t)v;
            } else if (c->digits == 0) {
                return -1;
            } else if (ch == ';' || ch == ' ' || ch == '\t') {
                c->state = CH_SIZE_EXT;
            } else if (ch == '\r') {
                c->state = CH_SIZE_LF;
            } else {
                return -1;
            }
            i++;
            break;
        }
        case CH_SIZE_EXT:
            if (ch == '\r') c->state = CH_SIZE_LF;
            else if (ch == '\n') return -1;
            i++;
            break;
        case CH_SIZE_LF:
            if (ch != '\n') return -1;
            c->state = c->remain ? CH_DATA : CH_TRAILER;
            i++;
            break;
        case CH_DATA: {
            size_t take = n - i;
            if ((uint64_t)take > c->remain) take = (size_t)c->remain;
            if (buf_append(out, in + i, take) < 0) return -2;
            c->remain -= take;
            i += take;
            if (c->remain == 0) c->state = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            if (ch != '\r') return -1;
            c->state = CH_DATA_LF;
            i++;
            break;
        case CH_DATA_LF:
            if (ch != '\n') return -1;
            c->state = CH_SIZE;
            c->digits = 0;
            c->remain = 0;
            i++;
            break;
        case CH_TRAILER:  /* the start of a trailer line, or the final empty line */
            c->state = ch == '\r' ? CH_END_LF : CH_TRAILER_LINE;
            i++;
            break;
        case CH_TRAILER_LINE:
            if (ch == '\r') c->state = CH_TRAILER_LF;
            i++;
            break;
        case CH_TRAILER_LF:
            if (ch != '\n') return -1;
            c->state = CH_TRAILER;
            i++;
            break;
        case CH_END_LF:
            if (ch != '\n') return -1;
            c->state = CH_DONE;
            i++;
            break;
        }
    }
    *used = i;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* sans-IO: the SSE scan (gateway/sse.py's SseScanner, in C)                                 */

typedef struct {
    int strip_usage;   /* the gateway asked for usage: cut the usage event that has no choices;
                        * else the client asked for it: count "data: " events as a fallback */
    int passthrough;   /* an event grew past MAX_EVENT: stop scanning */
    long data_events;
    buf_t tail;        /* a partial event held until its end arrives */
    buf_t usage;       /* the JSON of the last event with a non-null "usage" */
    int has_usage;
} scanner_t;

static const char USAGE_KEY[] = "\"usage\"";

static size_t count_data(const char *p, size_t n) {
    size_t count = 0;
    const char *end = p + n;
    while (p < end) {
        const char *hit = memmem(p, (size_t)(end - p), "data: ", 6);
        if (hit == NULL) break;
        count++;
        p = hit + 6;
    }
    return count;
}

/* In an event mentioning "usage": is its value null? (then it is neither read nor cut) */
static int usage_is_null(const char *hit, const char *end) {
    const char *p = hit + sizeof(USAGE_KEY) - 1;
    while (p < end && (*p == ' ' || *p == ':' || *p == '\t')) p++;
    return end - p >= 4 && memcmp(p, "null", 4) == 0;
}

static int choices_empty(const char *p, size_t n) {
    const char *hit = memmem(p, n, "\"choices\"", 9);
    if (hit == NULL) return 1;
    const char *end = p + n, *q = hit + 9;
    while (q < end && (*q == ' ' || *q == ':' || *q == '\t')) q++;
    if (q >= end || *q != '[') return 0;
    q++;
    while (q < end && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
    return q < end && *q == ']';
}

/* Complete events p[0:n] (n ends at a blank line): append what to forward to ``out``. */
static int scan_events(scanner_t *s, const char *p, size_t n, buf_t *out) {
    if (!s->strip_usage) s->data_events += (long)count_data(p, n);
    if (memmem(p, n, USAGE_KEY, sizeof(USAGE_KEY) - 1) == NULL) return buf_append(out, p, n);
    size_t start = 0;
    while (start < n) {
        const char *sep = memmem(p + start, n - start, "\n\n", 2);
        size_t end = sep ? (size_t)(sep - p) + 2 : n;
        const char *ev = p + start;
        size_t evlen = end - start;
        int keep = 1;
        const char *hit = memmem(ev, evlen, USAGE_KEY, sizeof(USAGE_KEY) - 1);
        if (hit != NULL && evlen > 6 && memcmp(ev, "data: ", 6) == 0 && !usage_is_null(hit, ev + evlen)) {
            size_t jlen = evlen - 6;
            while (jlen > 0 && ev[6 + jlen - 1] == '\n') jlen--;
            s->usage.len = 0;
            if (buf_append(&s->usage, ev + 6, jlen) < 0) return -1;
            s->has_usage = 1;
            if (s->strip_usage && choices_empty(ev, evlen)) keep = 0;
        }
        if (keep && buf_append(out, ev, evlen) < 0) return -1;
        start = end;
    }
    return 0;
}

static const char *rfind_sep(const char *p, size_t n) {
    if (n < 2) return NULL;
    for (size_t i = n - 1; i > 0; i--) {
        if (p[i] == '\n' && p[i - 1] == '\n') return p + i - 1;
    }
    return NULL;
}

/* Append to ``out`` what to forward for ``data``; hold a partial event. 0, or -1 (memory). */
static int scan_feed(scanner_t *s, const char *data, size_t n, buf_t *out) {
    if (s->passthrough) return buf_append(out, data, n);
    const char *p = data;
    size_t len = n;
    if (s->tail.len) {
        if (buf_append(&s->tail, data, n) < 0) return -1;
        p = s->tail.p;
        len = s->tail.len;
    }
    size_t cut;
    if (len >= 2 && p[len - 2] == '\n' && p[len - 1] == '\n') {
        cut = len;
    } else {
        const char *sep = rfind_sep(p, len);
        if (sep == NULL) {
            if (len > MAX_EVENT) {
                s->passthrough = 1;
                int rc = buf_append(out, p, len);
                s->tail.len = 0;
                return rc;
            }
            if (p == data) return buf_append(&s->tail, data, n);
            return 0;  /* already in the tail */
        }
        cut = (size_t)(sep - p) + 2;
    }
    if (scan_events(s, p, cut, out) < 0) return -1;
    if (cut < len) {
        if (p == s->tail.p) {
            memmove(s->tail.p, p + cut, len - cut);
            s->tail.len = len - cut;
        } else {
            if (buf_append(&s->tail, p + cut, len - cut) < 0) return -1;
        }
    } else {
        s->tail.len = 0;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* streams and the relay thread                                                              */

enum { OUT_NONE = -1, OUT_DONE, OUT_CLOSED, OUT_PROTOCOL, OUT_TIMEOUT, OUT_INTERNAL, OUT_CLIENT_GONE,
       OUT_CLIENT_TIMEOUT, OUT_CANCELLED };
static const char *const OUTCOME_NAMES[] = {"done", "closed", "protocol", "timeout", "internal",
                                            "client_gone", "client_timeout", "cancelled"};

/* System calls that failed where they should not have (the tests assert none did), with the
 * name and errno of one of them. Counted from any thread; the name and errno are two separate
 * relaxed stores, so with concurrent failures they may come from different calls. */
static long sys_errors = 0;
static const char *last_sys_call = NULL;
static int last_sys_errno = 0;

static int sys_error(const char *call, int err) {
    __atomic_add_fetch(&sys_errors, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&last_sys_call, call, __ATOMIC_RELAXED);
    __atomic_store_n(&last_sys_errno, err, __ATOMIC_RELAXED);
    return -1;
}

/* The mutex is an ordinary one, initialised in Relay_init: lock and unlock fail only on misuse,
 * which is counted like any other impossible failure. */
static void lock_mutex(pthread_mutex_t *m) {
    int rc = pthread_mutex_lock(m);
    if (rc != 0) sys_error("pthread_mutex_lock", rc);
}

static void unlock_mutex(pthread_mutex_t *m) {
    int rc = pthread_mutex_unlock(m);
    if (rc != 0) sys_error("pthread_mutex_unlock", rc);
}

struct stream;
typedef struct {
    struct stream *stream;
    int upstream;  /* 1: the upstream side, 0: the client side, -1: the relay's wake-up fd */
} side_t;

/* Ownership: from start() until it is queued on ``incoming`` a stream belongs to the loop
 * thread; from adoption until finish() to the relay thread, which alone registers its
 * descriptors with epoll, lists it as active and reads or writes its sockets; once finished it
 * is on the done queue and belongs to collect(), which frees it. */
typedef struct stream {
    int up_fd, cl_fd;
    int up_armed, cl_armed;  /* registered with the relay's epoll set */
    int armed_waiting;       /* the registration is for "client full" (EPOLLOUT, no upstream reads) */
    PyObject *token;         /* touched only with the GIL (start, collect, dealloc) */
    chunker_t chunker;
    scanner_t scanner;
    buf_t head;              /* the client's response head, held until the first data or the end */
    buf_t pending;           /* bytes the client has not taken yet (upstream reading stops) */
    size_t pending_off;
    int complete;            /* the upstream message ended; finish once pending is written */
    int reusable;            /* nothing followed the message on the upstream connection */
    int outcome;
    double last_read;        /* the last upstream read, or the end of a wait for the client */
    double paused_since;     /* the client's last progress while bytes wait for it */
    double first_byte;
    side_t up_side, cl_side;
    struct stream *prev, *next;  /* the active list (relay thread only) */
    struct stream *link;         /* the incoming queue, then the finished queue (under the lock) */
} stream_t;

typedef struct {
    buf_t body, payload;
    char rbuf[READ_SIZE];
} work_t;

typedef struct {
    PyObject_HEAD
    int epfd, done_fd, wake_fd;
    double read_timeout, send_timeout;
    pthread_t thread;
    int thread_started;          /* loop thread only */
    int lock_ready;
    pthread_mutex_t lock;        /* guards the fields up to ``active`` */
    stream_t *incoming;          /* started, not yet adopted by the relay thread */
    stream_t *done_head, *done_tail;
    int stop, cancel_all;
    int dead;                    /* the thread gave up (a failed epoll_wait) and published its last
                                  * batch: start() refuses, and only start() publishes from then on */
    stream_t *active;            /* relay thread only */
    side_t wake_side;
    work_t *main_work;           /* scratch for start() on the loop thread */
} RelayObject;

static double now_mono(void) {
    struct timespec ts;
    /* the clock of Python's time.perf_counter on Linux; fails only for a bad clock id */
    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0) {
        sys_error("clock_gettime", errno);
        return 0.0;
    }
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Stream structs alive (allocated by start(), freed by collect() or the Relay's end): the tests
 * check that it returns to zero, so a stream that is never freed fails them. */
static long live_streams = 0;

static void stream_free(stream_t *s) {
    __atomic_sub_fetch(&live_streams, 1, __ATOMIC_RELAXED);
    buf_free(&s->scanner.tail);
    buf_free(&s->scanner.usage);
    buf_free(&s->pending);
    buf_free(&s->head);
    free(s);
}

/* Write iov to the client; keep what the socket did not take. OUT_NONE, or an outcome. */
static int emit(stream_t *s, struct iovec *iov, int cnt, double now) {
    size_t total = 0;
    for (int i = 0; i < cnt; i++) total += iov[i].iov_len;
    if (total == 0) return OUT_NONE;
    ssize_t n = 0;
    int was_empty = s->pending.len == s->pending_off;
    if (was_empty) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)cnt;
        do {
            n = sendmsg(s->cl_fd, &msg, MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return OUT_CLIENT_GONE;
            n = 0;
        }
    }
    if ((size_t)n == total) return OUT_NONE;
    size_t skip = (size_t)n;
    for (int i = 0; i < cnt; i++) {
        size_t len = iov[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        if (buf_append(&s->pending, (const char *)iov[i].iov_base + skip, len - skip) < 0) return OUT_INTERNAL;
        skip = 0;
    }
    if (was_empty) s->paused_since = now;  /* the client send timeout starts now */
    return OUT_NONE;
}

/* One upstream read's bytes: decode, scan, write one chunk. Returns OUT_NONE to go on. */
static int process(stream_t *s, work_t *w, const char *data, size_t n, double now) {
    w->body.len = 0;
    w->payload.len = 0;
    size_t used = 0;
    int rc = dechunk(&s->chunker, data, n, &w->body, &used);
    if (rc == -1) return OUT_PROTOCOL;
    if (rc == -2) return OUT_INTERNAL;
    if (s->chunker.state == CH_DONE) {
        s->complete = 1;
        if (used < n) s->reusable = 0;  /* bytes nobody asked for: do not pool the connection */
    }
    if (w->body.len && scan_feed(&s->scanner, w->body.p, w->body.len, &w->payload) < 0) return OUT_INTERNAL;
    if (s->complete && s->scanner.tail.len) {
        if (buf_append(&w->payload, s->scanner.tail.p, s->scanner.tail.len) < 0) return OUT_INTERNAL;
        s->scanner.tail.len = 0;
    }
    char hex[24];
    struct iovec iov[4];
    int cnt = 0;
    /* The response head is held until there is data or an end to send with it (one write). */
    int with_head = s->head.len && (w->payload.len || s->complete);
    if (with_head) iov[cnt++] = (struct iovec){s->head.p, s->head.len};
    if (w->payload.len) {
        int hl = snprintf(hex, sizeof hex, "%zx\r\n", w->payload.len);
        iov[cnt++] = (struct iovec){hex, (size_t)hl};
        iov[cnt++] = (struct iovec){w->payload.p, w->payload.len};
        if (!s->first_byte) s->first_byte = now;
    }
    if (s->complete) {
        iov[cnt++] = w->payload.len ? (struct iovec){"\r\n0\r\n\r\n", 7} : (struct iovec){"0\r\n\r\n", 5};
    } else if (w->payload.len) {
        iov[cnt++] = (struct iovec){"\r\n", 2};
    }
    rc = emit(s, iov, cnt, now);
    if (with_head && rc != OUT_CLIENT_GONE) s->head.len = 0;  /* written, or pending with the rest */
    if (rc != OUT_NONE) return rc;
    if (s->complete && s->pending.len == s->pending_off) return OUT_DONE;
    return OUT_NONE;
}

/* Relay thread: register both sides, or update them after the client filled up or drained.
 * -1 if epoll refused (the caller ends the stream). */
static int arm(RelayObject *r, stream_t *s) {
    int waiting = s->pending.len > s->pending_off;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = waiting ? 0 : EPOLLIN;  /* backpressure: no upstream read while the client is full */
    ev.data.ptr = &s->up_side;
    if (epoll_ctl(r->epfd, s->up_armed ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->up_fd, &ev) < 0)
        return sys_error("epoll_ctl(upstream)", errno);
    s->up_armed = 1;
    ev.events = EPOLLRDHUP | (waiting ? EPOLLOUT : 0);
    ev.data.ptr = &s->cl_side;
    if (epoll_ctl(r->epfd, s->cl_armed ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->cl_fd, &ev) < 0)
        return sys_error("epoll_ctl(client)", errno);
    s->cl_armed = 1;
    s->armed_waiting = waiting;
    return 0;
}

/* Relay thread: a stream ends; it joins ``batch``, queued for collect() after the epoll batch
 * that finished it, so no event of that batch can point at freed memory. */
static void finish(RelayObject *r, stream_t *s, int outcome, stream_t **batch) {
    if (s->outcome != OUT_NONE) return;
    s->outcome = outcome;
    if (s->up_armed && epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->up_fd, NULL) < 0) sys_error("epoll_ctl(DEL)", errno);
    if (s->cl_armed && epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->cl_fd, NULL) < 0) sys_error("epoll_ctl(DEL)", errno);
    s->up_armed = s->cl_armed = 0;
    if (s->prev) s->prev->next = s->next; else if (r->active == s) r->active = s->next;
    if (s->next) s->next->prev = s->prev;
    s->prev = s->next = NULL;
    s->link = *batch;
    *batch = s;
}

static void signal_fd(int fd, const char *what) {
    uint64_t one = 1;
    ssize_t rc;
    do {
        rc = write(fd, &one, sizeof one);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) sys_error(what, errno);  /* EAGAIN only at 2^64-1 pending signals */
}

static void drain_fd(int fd, const char *what) {
    uint64_t v;
    ssize_t rc;
    do {
        rc = read(fd, &v, sizeof v);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EAGAIN && errno != EWOULDBLOCK) sys_error(what, errno);
}

/* Queue finished streams for collect() and make the completion eventfd readable. */
static void publish(RelayObject *r, stream_t *batch) {
    if (batch == NULL) return;
    lock_mutex(&r->lock);
    int was_empty = r->done_head == NULL;
    while (batch) {
        stream_t *next = batch->link;
        batch->link = NULL;
        if (r->done_tail) r->done_tail->link = batch; else r->done_head = batch;
        r->done_tail = batch;
        batch = next;
    }
    unlock_mutex(&r->lock);
    if (was_empty) signal_fd(r->done_fd, "write(done eventfd)");
}

static void on_upstream(RelayObject *r, stream_t *s, work_t *w, double now, stream_t **batch) {
    ssize_t n;
    do {
        n = read(s->up_fd, w->rbuf, READ_SIZE);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        finish(r, s, OUT_CLOSED, batch);
        return;
    }
    if (n == 0) {
        finish(r, s, OUT_CLOSED, batch);
        return;
    }
    s->last_read = now;
    int rc = process(s, w, w->rbuf, (size_t)n, now);
    if (rc != OUT_NONE) {
        finish(r, s, rc, batch);
    } else if (s->pending.len > s->pending_off && !s->armed_waiting && arm(r, s) < 0) {
        finish(r, s, OUT_INTERNAL, batch);
    }
}

static void on_client_writable(RelayObject *r, stream_t *s, double now, stream_t **batch) {
    size_t left = s->pending.len - s->pending_off;
    ssize_t n;
    do {
        n = send(s->cl_fd, s->pending.p + s->pending_off, left, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        finish(r, s, OUT_CLIENT_GONE, batch);
        return;
    }
    /* Any progress restarts the send timeout: it is the time between two successful writes. */
    s->paused_since = now;
    s->pending_off += (size_t)n;
    if (s->pending_off < s->pending.len) return;
    s->pending.len = s->pending_off = 0;
    if (s->complete) {
        finish(r, s, OUT_DONE, batch);
        return;
    }
    s->last_read = now;  /* time paused for a slow client does not count against the upstream */
    if (arm(r, s) < 0) finish(r, s, OUT_INTERNAL, batch);
}

/* Relay thread: take over the streams start() queued; one that ended in start() already (its
 * outcome is set) only goes on to the finished queue. */
static void adopt(RelayObject *r, stream_t *s, stream_t **batch) {
    while (s) {
        stream_t *next = s->link;
        s->link = NULL;
        if (s->outcome != OUT_NONE) {
            s->link = *batch;
            *batch = s;
            s = next;
            continue;
        }
        s->prev = NULL;
        s->next = r->active;
        if (r->active) r->active->prev = s;
        r->active = s;
        if (arm(r, s) < 0) finish(r, s, OUT_INTERNAL, batch);
        s = next;
    }
}

/* Relay thread: timeouts, or end everything with ``cancel`` (OUT_NONE: timeouts only). */
static void sweep(RelayObject *r, double now, int cancel, stream_t **batch) {
    stream_t *s = r->active;
    while (s) {
        stream_t *next = s->next;  /* finish() unlinks s */
        int waiting = s->pending.len > s->pending_off;
        if (cancel != OUT_NONE) finish(r, s, cancel, batch);
        else if (waiting && now - s->paused_since >= r->send_timeout) finish(r, s, OUT_CLIENT_TIMEOUT, batch);
        else if (!waiting && now - s->last_read >= r->read_timeout) finish(r, s, OUT_TIMEOUT, batch);
        s = next;
    }
}

static void *relay_main(void *arg) {
    RelayObject *r = (RelayObject *)arg;
    work_t *w = calloc(1, sizeof(work_t));
    int fatal = w == NULL;
    if (fatal) sys_error("calloc", ENOMEM);
    struct epoll_event events[MAX_EVENTS];
    double next_sweep = now_mono() + 1.0;
    int stop = 0;
    while (!stop) {
        int n = fatal ? 0 : epoll_wait(r->epfd, events, MAX_EVENTS, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;  /* signals are blocked here; ptrace can still interrupt */
            sys_error("epoll_wait", errno);
            fatal = 1;
            n = 0;
        }
        double now = now_mono();
        stream_t *batch = NULL;
        int woken = fatal;
        for (int i = 0; i < n; i++) {
            side_t *sd = (side_t *)events[i].data.ptr;
            if (sd->upstream < 0) {
                drain_fd(r->wake_fd, "read(wake eventfd)");
                woken = 1;
                continue;
            }
            stream_t *s = sd->stream;
            if (s->outcome != OUT_NONE) continue;  /* finished earlier in this batch */
            uint32_t ev = events[i].events;
            if (sd->upstream) {
                on_upstream(r, s, w, now, &batch);
            } else {
                if (ev & EPOLLOUT) on_client_writable(r, s, now, &batch);
                if (s->outcome == OUT_NONE && (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                    finish(r, s, OUT_CLIENT_GONE, &batch);
            }
        }
        if (woken || now >= next_sweep) {
            lock_mutex(&r->lock);
            stream_t *incoming = r->incoming;
            r->incoming = NULL;
            int cancel = r->cancel_all;
            r->cancel_all = 0;
            stop = r->stop || fatal;
            unlock_mutex(&r->lock);
            adopt(r, incoming, &batch);
            sweep(r, now, fatal ? OUT_INTERNAL : (cancel || stop) ? OUT_CANCELLED : OUT_NONE, &batch);
            if (now >= next_sweep) next_sweep = now + 1.0;
        }
        publish(r, batch);
    }
    if (fatal) {  /* what start() queued since the last look ends too; then start() refuses */
        lock_mutex(&r->lock);
        stream_t *late = r->incoming;
        r->incoming = NULL;
        r->dead = 1;
        unlock_mutex(&r->lock);
        stream_t *batch = NULL;
        adopt(r, late, &batch);
        sweep(r, now_mono(), OUT_INTERNAL, &batch);
        publish(r, batch);
    }
    if (w) {
        buf_free(&w->body);
        buf_free(&w->payload);
        free(w);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* the Python type                                                                           */

static int Relay_init(RelayObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"read_timeout", "send_timeout", NULL};
    double read_timeout, send_timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dd", kwlist, &read_timeout, &send_timeout)) return -1;
    if (r->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Relay already initialised");
        return -1;
    }
    if (!(read_timeout > 0) || !(send_timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "timeouts must be positive");
        return -1;
    }
    r->read_timeout = read_timeout;
    r->send_timeout = send_timeout;
    /* Each failure below leaves what was made to Relay_dealloc, which checks every field. */
    if ((r->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
        (r->done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
        (r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if ((r->main_work = calloc(1, sizeof(work_t))) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = pthread_mutex_init(&r->lock, NULL);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->lock_ready = 1;
    r->wake_side.stream = NULL;
    r->wake_side.upstream = -1;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = &r->wake_side;
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* The thread starts with every signal blocked: they are the interpreter's to handle. */
    sigset_t all, old;
    if (sigfillset(&all) < 0 || (rc = pthread_sigmask(SIG_SETMASK, &all, &old)) != 0) {
        errno = rc ? rc : errno;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    rc = pthread_create(&r->thread, NULL, relay_main, r);
    int rc2 = pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) r->thread_started = 1;
    if (rc != 0 || rc2 != 0) {
        errno = rc ? rc : rc2;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    RelayObject *r = (RelayObject *)type->tp_alloc(type, 0);
    if (r != NULL) r->epfd = r->done_fd = r->wake_fd = -1;
    return (PyObject *)r;
}

static void free_list(stream_t *s, int via_link) {
    while (s) {
        stream_t *next = via_link ? s->link : s->next;
        Py_XDECREF(s->token);
        stream_free(s);
        s = next;
    }
}

static void relay_stop(RelayObject *r) {
    if (!r->thread_started) return;
    lock_mutex(&r->lock);
    r->stop = 1;
    unlock_mutex(&r->lock);
    signal_fd(r->wake_fd, "write(wake eventfd)");
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    if (rc != 0) sys_error("pthread_join", rc);
    r->thread_started = 0;
}

static void close_fd(int *fd) {
    if (*fd >= 0 && close(*fd) < 0) sys_error("close", errno);
    *fd = -1;
}

static void Relay_dealloc(RelayObject *r) {
    relay_stop(r);
    /* The thread is gone: its final sweep cancelled every stream, which collect() did not take. */
    free_list(r->active, 0);
    r->active = NULL;
    free_list(r->incoming, 1);
    r->incoming = NULL;
    free_list(r->done_head, 1);
    r->done_head = r->done_tail = NULL;
    if (r->main_work) {
        buf_free(&r->main_work->body);
        buf_free(&r->main_work->payload);
        free(r->main_work);
        r->main_work = NULL;
    }
    close_fd(&r->epfd);
    close_fd(&r->done_fd);
    close_fd(&r->wake_fd);
    if (r->lock_ready) pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int relay_refuses(RelayObject *r) {
    lock_mutex(&r->lock);
    int refuses = r->stop || r->dead;
    unlock_mutex(&r->lock);
    return refuses;
}

static PyObject *Relay_start(RelayObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"client_fd", "upstream_fd", "head", "body", "strip_usage", "token", NULL};
    int cl_fd, up_fd, strip_usage;
    Py_buffer head, body;
    PyObject *token;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiy*y*pO", kwlist, &cl_fd, &up_fd, &head, &body,
                                     &strip_usage, &token))
        return NULL;
    PyObject *result = NULL;
    if (!r->thread_started || relay_refuses(r)) {
        PyErr_SetString(PyExc_RuntimeError, "the relay is closed");
        goto out;
    }
    if (cl_fd < 0 || up_fd < 0 || cl_fd == up_fd) {
        PyErr_SetString(PyExc_ValueError, "two distinct open file descriptors are needed");
        goto out;
    }
    stream_t *s = calloc(1, sizeof(stream_t));
    if (s == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    __atomic_add_fetch(&live_streams, 1, __ATOMIC_RELAXED);
    s->up_fd = up_fd;
    s->cl_fd = cl_fd;
    s->outcome = OUT_NONE;
    s->reusable = 1;
    s->scanner.strip_usage = strip_usage;
    s->up_side = (side_t){s, 1};
    s->cl_side = (side_t){s, 0};
    double now = now_mono();
    s->last_read = s->paused_since = now;
    if (buf_append(&s->head, head.buf, (size_t)head.len) < 0) {
        stream_free(s);
        PyErr_NoMemory();
        goto out;
    }
    Py_INCREF(token);
    s->token = token;
    /* From here the stream is given back through collect() exactly once, whatever happens. It goes
     * to the relay thread even when it ended here already (the whole answer came with the head, or
     * the client left): while the thread runs it alone publishes finished streams. */
    int rc = process(s, r->main_work, body.buf, (size_t)body.len, now);
    s->outcome = rc;
    lock_mutex(&r->lock);
    int refuses = r->stop || r->dead;
    if (!refuses) {
        s->link = r->incoming;
        r->incoming = s;
    }
    unlock_mutex(&r->lock);
    if (!refuses) {
        signal_fd(r->wake_fd, "write(wake eventfd)");
    } else {  /* the thread is gone (close() runs on this thread) or has published its last batch */
        if (s->outcome == OUT_NONE) s->outcome = OUT_CANCELLED;
        publish(r, s);
    }
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&head);
    PyBuffer_Release(&body);
    return result;
}

static PyObject *Relay_collect(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    if (r->done_fd < 0) return PyList_New(0);
    drain_fd(r->done_fd, "read(done eventfd)");  /* first: a later publish() signals again */
    lock_mutex(&r->lock);
    stream_t *s = r->done_head;
    r->done_head = r->done_tail = NULL;
    unlock_mutex(&r->lock);
    PyObject *list = PyList_New(0);
    while (s) {
        stream_t *next = s->link;
        if (list != NULL) {
            PyObject *item = Py_BuildValue(
                "(Osy#NldNN)", s->token, OUTCOME_NAMES[s->outcome],
                s->pending.p ? s->pending.p + s->pending_off : "",  /* y# makes None of NULL */
                (Py_ssize_t)(s->pending.len - s->pending_off),
                s->scanner.has_usage ? PyBytes_FromStringAndSize(s->scanner.usage.p, (Py_ssize_t)s->scanner.usage.len)
                                     : Py_NewRef(Py_None),
                s->scanner.data_events, s->first_byte, PyBool_FromLong(s->reusable && s->outcome == OUT_DONE),
                PyBool_FromLong(s->head.len == 0));
            if (item == NULL || PyList_Append(list, item) < 0) Py_CLEAR(list);
            Py_XDECREF(item);
        }
        Py_XDECREF(s->token);
        stream_free(s);
        s = next;
    }
    return list;
}

static PyObject *Relay_fileno(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(r->done_fd);
}

static PyObject *Relay_cancel_all(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    if (r->thread_started) {
        lock_mutex(&r->lock);
        r->cancel_all = 1;
        unlock_mutex(&r->lock);
        signal_fd(r->wake_fd, "write(wake eventfd)");
    }
    Py_RETURN_NONE;
}

static PyObject *Relay_close(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    relay_stop(r);
    Py_RETURN_NONE;
}

static PyMethodDef Relay_methods[] = {
    {"start", (PyCFunction)(void (*)(void))Relay_start, METH_VARARGS | METH_KEYWORDS,
     "Relay the rest of a committed stream (see the module's contract)."},
    {"collect", (PyCFunction)Relay_collect, METH_NOARGS, "Finished streams, as result tuples."},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The completion eventfd (readable: collect)."},
    {"cancel_all", (PyCFunction)Relay_cancel_all, METH_NOARGS, "End every stream in flight (shutdown)."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "Cancel everything and stop the thread."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._crelay.Relay",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thread that relays committed streams from upstream to client sockets.",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

/* ---------------------------------------------------------------------------------------- */
/* the sans-IO core, for tests: what the relay would write for a sequence of upstream reads  */

static PyObject *transform(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"reads", "strip_usage", NULL};
    PyObject *reads;
    int strip_usage;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Op", kwlist, &reads, &strip_usage)) return NULL;
    PyObject *seq = PySequence_Fast(reads, "reads must be a sequence of bytes");
    if (seq == NULL) return NULL;
    chunker_t c = {0};
    scanner_t s = {0};
    s.strip_usage = strip_usage;
    buf_t body = {0}, payload = {0};
    PyObject *outs = PyList_New(0);
    const char *error = NULL;
    int complete = 0, extra = 0;
    for (Py_ssize_t i = 0; outs != NULL && i < PySequence_Fast_GET_SIZE(seq) && !error && !complete; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "reads must be bytes");
            Py_CLEAR(outs);
            break;
        }
        body.len = payload.len = 0;
        size_t used = 0;
        int rc = dechunk(&c, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item), &body, &used);
        if (rc < 0) {
            error = rc == -1 ? "protocol" : "internal";
            break;
        }
        if (c.state == CH_DONE) {
            complete = 1;
            extra = used < (size_t)PyBytes_GET_SIZE(item);
        }
        if ((body.len && scan_feed(&s, body.p, body.len, &payload) < 0) ||
            (complete && s.tail.len && buf_append(&payload, s.tail.p, s.tail.len) < 0)) {
            error = "internal";
            break;
        }
        PyObject *b = PyBytes_FromStringAndSize(payload.p, (Py_ssize_t)payload.len);
        if (b == NULL || PyList_Append(outs, b) < 0) Py_CLEAR(outs);
        Py_XDECREF(b);
    }
    PyObject *result = NULL;
    if (outs != NULL) {
        PyObject *usage = s.has_usage ? PyBytes_FromStringAndSize(s.usage.p, (Py_ssize_t)s.usage.len)
                                      : Py_NewRef(Py_None);
        if (usage != NULL)
            result = Py_BuildValue("(NNlzNN)", outs, usage, s.data_events, error, PyBool_FromLong(complete),
                                   PyBool_FromLong(extra));
        else
            Py_DECREF(outs);
    }
    Py_DECREF(seq);
    buf_free(&body);
    buf_free(&payload);
    buf_free(&s.tail);
    buf_free(&s.usage);
    return result;
}

static PyObject *live_streams_py(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(__atomic_load_n(&live_streams, __ATOMIC_RELAXED));
}

static PyObject *syscall_errors_py(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored)) {
    const char *call = __atomic_load_n(&last_sys_call, __ATOMIC_RELAXED);
    return Py_BuildValue("(lzi)", __atomic_load_n(&sys_errors, __ATOMIC_RELAXED), call,
                         __atomic_load_n(&last_sys_errno, __ATOMIC_RELAXED));
}

static PyMethodDef module_methods[] = {
    {"syscall_errors", syscall_errors_py, METH_NOARGS,
     "(count, call, errno): system calls of the relay that failed unexpectedly, and one of them."},
    {"live_streams", live_streams_py, METH_NOARGS,
     "Stream structs allocated and not yet freed, over every Relay of the process (tests)."},
    {"transform", (PyCFunction)(void (*)(void))transform, METH_VARARGS | METH_KEYWORDS,
     "The relay's decode-scan step over upstream reads: (payloads, usage, data_events, error, complete, "
     "extra)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "gateway._crelay", "Streams relayed by a C thread (see gateway/offload.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__crelay(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
