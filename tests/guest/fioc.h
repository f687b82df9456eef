/* The ioctls of libfuse's CUSE example device (example/ioctl.h): same numbers, same struct. */
#ifndef AFUSE_FIOC_H
#define AFUSE_FIOC_H

#include <sys/ioctl.h>
#include <sys/types.h>

enum {
	FIOC_GET_SIZE = _IOR('E', 0, size_t),
	FIOC_SET_SIZE = _IOW('E', 1, size_t),
	/* Variable-sized transfers through struct fioc_rw_arg (no size in the number). */
	FIOC_READ = _IO('E', 2),
	FIOC_WRITE = _IO('E', 3),
};

struct fioc_rw_arg {
	off_t offset;
	void *buf;
	size_t size;
	size_t prev_size;	/* out: the buffer's size before */
	size_t new_size;	/* out: the buffer's size after */
};

#endif
