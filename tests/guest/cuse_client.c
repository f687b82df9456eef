/*
 * A client of the byte-buffer CUSE device, written against fioc.h (libfuse's example ioctls).
 *
 *   cuse_client DEV get                 print the size
 *   cuse_client DEV set SIZE            set the size
 *   cuse_client DEV read SIZE OFFSET    FIOC_READ: data to stdout, "ret prev new" to stderr
 *   cuse_client DEV write SIZE OFFSET   FIOC_WRITE of SIZE bytes from stdin, "ret prev new" to stderr
 *   cuse_client DEV readwait SECONDS    read(2) interrupted by SIGALRM after SECONDS: prints EINTR
 *
 * Exit status 0 on success; errors are printed as "error: <call>: <strerror>" with status 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fioc.h"

static int fail(const char *what)
{
	fprintf(stderr, "error: %s: %s\n", what, strerror(errno));
	return 1;
}

static void on_alarm(int sig)
{
	(void)sig;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s DEV get|set|read|write|readwait [ARGS]\n", argv[0]);
		return 2;
	}
	const char *cmd = argv[2];
	int fd = open(argv[1], O_RDWR);
	if (fd < 0)
		return fail("open");

	if (!strcmp(cmd, "get")) {
		size_t size;
		if (ioctl(fd, FIOC_GET_SIZE, &size))
			return fail("FIOC_GET_SIZE");
		printf("%zu\n", size);
	} else if (!strcmp(cmd, "set") && argc == 4) {
		size_t size = strtoull(argv[3], NULL, 0);
		if (ioctl(fd, FIOC_SET_SIZE, &size))
			return fail("FIOC_SET_SIZE");
	} else if ((!strcmp(cmd, "read") || !strcmp(cmd, "write")) && argc == 5) {
		int is_read = !strcmp(cmd, "read");
		struct fioc_rw_arg arg = { 0 };
		arg.size = strtoull(argv[3], NULL, 0);
		arg.offset = strtoll(argv[4], NULL, 0);
		arg.buf = calloc(1, arg.size + 1);
		arg.prev_size = arg.new_size = (size_t)-1;
		if (!arg.buf)
			return fail("calloc");
		if (!is_read) {
			size_t got = 0;
			while (got < arg.size) {
				ssize_t n = read(0, (char *)arg.buf + got, arg.size - got);
				if (n <= 0)
					break;
				got += n;
			}
			arg.size = got;
		}
		int ret = ioctl(fd, is_read ? FIOC_READ : FIOC_WRITE, &arg);
		if (ret < 0)
			return fail(is_read ? "FIOC_READ" : "FIOC_WRITE");
		if (is_read && fwrite(arg.buf, 1, ret, stdout) != (size_t)ret)
			return fail("fwrite");
		fprintf(stderr, "%d %zu %zu\n", ret, arg.prev_size, arg.new_size);
	} else if (!strcmp(cmd, "readwait") && argc == 4) {
		struct sigaction sa = { 0 };
		char buf[64];
		sa.sa_handler = on_alarm;	/* no SA_RESTART: read(2) returns EINTR */
		sigaction(SIGALRM, &sa, NULL);
		alarm(atoi(argv[3]));
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR) {
			printf("EINTR\n");
		} else if (n < 0) {
			return fail("read");
		} else {
			printf("read %zd\n", n);
			return 1;
		}
	} else {
		fprintf(stderr, "unknown command %s\n", cmd);
		return 2;
	}
	if (close(fd))
		return fail("close");
	return 0;
}
