/*
 * ol_io.c — read a byte range of a file into a caller's buffer with many requests in flight.
 *
 * No Python or torch headers: the binding (ol_module.c) is a thin layer on top. Every function
 * returns 0 or -errno; a file that ends before the requested range returns OL_SHORT and reports how
 * many leading bytes are valid. Completions are checked one by one: a short completion is
 * resubmitted for its remainder, an error completion fails the whole read (after the requests still
 * in flight have drained, so the caller's buffer is never written after we return).
 *
 * Engines: io_uring through raw syscalls (no liburing needed at build or run time), else a small
 * pthread pool of pread()s. O_DIRECT needs aligned offsets, lengths and addresses; an unaligned
 * tail is read through an aligned bounce buffer.
 */
#define _GNU_SOURCE
#include "ol_io.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__linux__) && defined(__NR_io_uring_setup)
#include <linux/io_uring.h>
#define OL_HAVE_URING 1
#else
#define OL_HAVE_URING 0
#endif

#define OL_ALIGN 4096u

/* ------------------------------------------------------------------------------------------ */
/* plain pread loop (used for bounce reads and by the thread engine)                            */

static int64_t ol_pread_full(int fd, char *buf, uint64_t len, uint64_t off, uint64_t *got) {
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return -errno;
        }
        if (n == 0) break;
        done += (uint64_t)n;
    }
    *got = done;
    return 0;
}

/* Read [off, off+len) where off is aligned but len is not: via an aligned bounce buffer. */
static int64_t ol_read_tail(int fd, char *dst, uint64_t len, uint64_t off, uint64_t *got) {
    uint64_t span = (len + OL_ALIGN - 1) / OL_ALIGN * OL_ALIGN;
    void *bounce = NULL;
    if (posix_memalign(&bounce, OL_ALIGN, span) != 0) return -ENOMEM;
    uint64_t n = 0;
    int64_t rc = ol_pread_full(fd, bounce, span, off, &n);
    if (rc == 0 || n > 0) memcpy(dst, bounce, n < len ? n : len);
    free(bounce);
    *got = n < len ? n : len;
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* thread engine                                                                                */

typedef struct {
    int fd;
    char *buf;
    char *bounce;                  /* NULL, or one chunk per thread: each request lands there, then is copied */
    uint64_t off, len, chunk;
    atomic_uint_fast64_t next;     /* next chunk index to claim */
    atomic_int err;                /* first -errno seen */
    atomic_uint_fast64_t short_at; /* lowest offset (relative) where the file ended */
} ol_job;

typedef struct {
    ol_job *job;
    int index; /* this thread's chunk of the bounce region */
} ol_worker_arg;

static void *ol_worker(void *arg) {
    ol_worker_arg *w = (ol_worker_arg *)arg;
    ol_job *j = w->job;
    char *bounce = j->bounce ? j->bounce + (uint64_t)w->index * j->chunk : NULL;
    uint64_t nchunks = (j->len + j->chunk - 1) / j->chunk;
    for (;;) {
        if (atomic_load(&j->err)) break;
        uint64_t i = atomic_fetch_add(&j->next, 1);
        if (i >= nchunks) break;
        uint64_t start = i * j->chunk, n = j->len - start < j->chunk ? j->len - start : j->chunk, got = 0;
        int64_t rc = ol_pread_full(j->fd, bounce ? bounce : j->buf + start, n, j->off + start, &got);
        if (bounce && got) memcpy(j->buf + start, bounce, got);
        if (rc < 0) {
            int zero = 0;
            atomic_compare_exchange_strong(&j->err, &zero, (int)rc);
            break;
        }
        if (got < n) {
            uint_fast64_t cur = atomic_load(&j->short_at);
            while (start + got < cur && !atomic_compare_exchange_weak(&j->short_at, &cur, start + got)) {}
        }
    }
    return NULL;
}

static int64_t ol_read_threads(int fd, char *buf, uint64_t len, uint64_t off, uint64_t chunk, int depth,
                               char *bounce, uint64_t bounce_len, uint64_t *valid) {
    ol_job j = {.fd = fd, .buf = buf, .bounce = bounce, .off = off, .len = len, .chunk = chunk};
    atomic_init(&j.next, 0);
    atomic_init(&j.err, 0);
    atomic_init(&j.short_at, UINT64_MAX);
    uint64_t nchunks = (len + chunk - 1) / chunk;
    int nthreads = depth < 1 ? 1 : depth;
    if ((uint64_t)nthreads > nchunks) nthreads = (int)nchunks;
    pthread_t tids[64];
    ol_worker_arg args[64];
    if (nthreads > 64) nthreads = 64;
    if (bounce && (uint64_t)nthreads * chunk > bounce_len) nthreads = (int)(bounce_len / chunk);
    if (nthreads < 1) return -EINVAL;
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        args[t] = (ol_worker_arg){.job = &j, .index = t};
        if (pthread_create(&tids[started], NULL, ol_worker, &args[t]) != 0) break;
        started++;
    }
    args[0] = (ol_worker_arg){.job = &j, .index = 0};
    ol_worker(&args[0]); /* the calling thread works too */
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);
    int err = atomic_load(&j.err);
    if (err) return err;
    uint64_t s = atomic_load(&j.short_at);
    if (s != UINT64_MAX) {
        *valid = s;
        return OL_SHORT;
    }
    *valid = len;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* io_uring engine (raw syscalls)                                                               */

#if OL_HAVE_URING
typedef struct {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_len, cq_len, sqes_len;
    unsigned entries;
} ol_ring;

static void ol_ring_close(ol_ring *r) {
    if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_len);
    if (r->cq_ptr && r->cq_ptr != MAP_FAILED && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_len);
    if (r->sq_ptr && r->sq_ptr != MAP_FAILED) munmap(r->sq_ptr, r->sq_len);
    if (r->fd >= 0) close(r->fd);
    r->fd = -1;
}

static int ol_ring_open(ol_ring *r, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(r, 0, sizeof *r);
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) return -errno;
    r->entries = p.sq_entries;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && r->cq_len > r->sq_len) r->sq_len = r->cq_len;
    r->sq_ptr = mmap(0, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) { int e = -errno; ol_ring_close(r); return e; }
    r->cq_ptr = single ? r->sq_ptr
                       : mmap(0, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    if (r->cq_ptr == MAP_FAILED) { int e = -errno; ol_ring_close(r); return e; }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(0, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) { int e = -errno; ol_ring_close(r); return e; }
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

static void ol_ring_push(ol_ring *r, int fd, void *addr, unsigned len, uint64_t off, uint64_t tag) {
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_READ;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)addr;
    sqe->len = len;
    sqe->off = off;
    sqe->user_data = tag;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

typedef struct { uint64_t start, len, done; } ol_req;

static int64_t ol_read_uring(int fd, char *buf, uint64_t len, uint64_t off, uint64_t chunk, int depth,
                             uint64_t *valid) {
    unsigned qd = depth < 1 ? 1 : (unsigned)depth;
    if (qd > 256) qd = 256;
    ol_ring r;
    int rc = ol_ring_open(&r, qd);
    if (rc < 0) return rc;
    if (qd > r.entries) qd = r.entries;
    uint64_t nchunks = (len + chunk - 1) / chunk;
    ol_req *reqs = calloc(qd, sizeof(ol_req));
    if (!reqs) { ol_ring_close(&r); return -ENOMEM; }
    unsigned *free_slots = calloc(qd, sizeof(unsigned));
    if (!free_slots) { free(reqs); ol_ring_close(&r); return -ENOMEM; }
    unsigned nfree = qd;
    for (unsigned i = 0; i < qd; i++) free_slots[i] = qd - 1 - i;
    uint64_t next = 0, short_at = UINT64_MAX;
    unsigned inflight = 0, to_submit = 0;
    int64_t err = 0;
    while ((next < nchunks && !err && short_at == UINT64_MAX) || inflight) {
        while (nfree && next < nchunks && !err && short_at == UINT64_MAX) {
            unsigned s = free_slots[--nfree];
            reqs[s].start = next * chunk;
            reqs[s].len = len - reqs[s].start < chunk ? len - reqs[s].start : chunk;
            reqs[s].done = 0;
            ol_ring_push(&r, fd, buf + reqs[s].start, (unsigned)reqs[s].len, off + reqs[s].start, s);
            next++, inflight++, to_submit++;
        }
        int n = (int)syscall(__NR_io_uring_enter, r.fd, to_submit, inflight ? 1 : 0, IORING_ENTER_GETEVENTS, NULL, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EBUSY) continue;
            /* The ring itself failed (not an I/O error, which arrives as a completion): nothing
             * more can be reaped. Tearing the ring down cancels and waits for what is queued. */
            err = -errno;
            break;
        }
        to_submit -= (unsigned)n > to_submit ? to_submit : (unsigned)n;
        unsigned head = *r.cq_head;
        unsigned tail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &r.cqes[head & *r.cq_mask];
            unsigned s = (unsigned)cqe->user_data;
            int res = cqe->res;
            ol_req *q = &reqs[s];
            if (res < 0) {
                if (res == -EAGAIN || res == -EINTR) { /* retry the same remainder */
                    ol_ring_push(&r, fd, buf + q->start + q->done, (unsigned)(q->len - q->done), off + q->start + q->done, s);
                    to_submit++;
                    continue;
                }
                if (!err) err = res;
            } else if (res == 0) { /* end of file inside this request */
                if (q->start + q->done < short_at) short_at = q->start + q->done;
            } else {
                q->done += (uint64_t)res;
                if (q->done < q->len && !err) { /* short completion: resubmit the rest */
                    ol_ring_push(&r, fd, buf + q->start + q->done, (unsigned)(q->len - q->done), off + q->start + q->done, s);
                    to_submit++;
                    continue;
                }
            }
            inflight--;
            free_slots[nfree++] = s;
        }
        __atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);
    }
    free(reqs);
    free(free_slots);
    ol_ring_close(&r);
    if (err) return err;
    if (short_at != UINT64_MAX) { *valid = short_at; return OL_SHORT; }
    *valid = len;
    return 0;
}
#endif

/* ------------------------------------------------------------------------------------------ */

int ol_uring_available(void) {
#if OL_HAVE_URING
    ol_ring r;
    if (ol_ring_open(&r, 2) < 0) return 0;
    ol_ring_close(&r);
    return 1;
#else
    return 0;
#endif
}

int64_t ol_read(int fd, void *dst, uint64_t len, uint64_t off, uint64_t chunk, int depth, int engine,
                void *bounce, uint64_t bounce_len, uint64_t *valid) {
    char *buf = (char *)dst;
    *valid = 0;
    if (len == 0) return 0;
    if (chunk < OL_ALIGN) chunk = OL_ALIGN;
    chunk = chunk / OL_ALIGN * OL_ALIGN;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -errno;
    int direct = (flags & O_DIRECT) != 0;
    uint64_t body = len, tail = 0;
    if (bounce && ((uintptr_t)bounce % OL_ALIGN || bounce_len < chunk)) return -EINVAL;
    if (bounce) engine = OL_ENGINE_THREADS; /* the bounce region is split among the pool's threads */
    if (direct) {
        if (off % OL_ALIGN || (uintptr_t)buf % OL_ALIGN) return -EINVAL; /* caller falls back to buffered */
        body = len / OL_ALIGN * OL_ALIGN;
        tail = len - body;
    }
    int64_t rc = 0;
    uint64_t got = 0;
    if (body) {
#if OL_HAVE_URING
        if (engine == OL_ENGINE_URING || engine == OL_ENGINE_AUTO) {
            rc = ol_read_uring(fd, buf, body, off, chunk, depth, &got);
            if (engine == OL_ENGINE_AUTO && (rc == -ENOSYS || rc == -EPERM || rc == -EINVAL))
                rc = ol_read_threads(fd, buf, body, off, chunk, depth, NULL, 0, &got);
        } else
#endif
        {
            if (engine == OL_ENGINE_URING) return -ENOSYS;
            rc = ol_read_threads(fd, buf, body, off, chunk, depth, (char *)bounce, bounce_len, &got);
        }
        if (rc != 0) { *valid = rc == OL_SHORT ? got : 0; return rc; }
    }
    if (tail) {
        uint64_t t = 0;
        rc = ol_read_tail(fd, buf + body, tail, off + body, &t);
        if (rc < 0) return rc;
        if (t < tail) { *valid = body + t; return OL_SHORT; }
    }
    *valid = len;
    return 0;
}
