/* ol_io.h — the native reader's C interface (no Python, no torch). Functions return 0 or -errno. */
#ifndef OL_IO_H
#define OL_IO_H
#include <stdint.h>

#define OL_ENGINE_AUTO 0   /* io_uring when the kernel allows it, else threads */
#define OL_ENGINE_URING 1
#define OL_ENGINE_THREADS 2
#define OL_SHORT 1         /* the file ended before the range: *valid bytes were read */

/* Read [off, off+len) of fd into dst, `depth` requests of `chunk` bytes in flight. With O_DIRECT,
 * off and dst must be 4096-aligned (else -EINVAL); an unaligned length is fine.
 * With `bounce` (4096-aligned, `bounce_len` bytes, NULL for none) the thread engine reads each request
 * into its thread's chunk of that region and copies it to dst (at most bounce_len / chunk threads):
 * where a VM's host copies into guest memory, a small region read over and over is faster to land
 * in than a large cold one, and the copy costs less than the difference (measured, not assumed). */
int64_t ol_read(int fd, void *dst, uint64_t len, uint64_t off, uint64_t chunk, int depth, int engine,
                void *bounce, uint64_t bounce_len, uint64_t *valid);

/* 1 when io_uring can be set up in this process (kernel support, not blocked by seccomp). */
int ol_uring_available(void);
#endif
