/*
 * ksmh-worker: the differential scenario worker for guests, a port of
 * harness/scenario/worker.py to static C (a busybox guest has no Python).
 *
 * The guest agent starts one per root process of a scenario (fork + exec, stdin/stdout are
 * pipes to the agent) and relays the runner's lines to it. The line protocol is worker.py's:
 *
 *   map <page_size> [huge|nohuge] <tok*count>...   mmap + MADV_[NO]HUGEPAGE + write pages +
 *                                                  MADV_MERGEABLE -> "ok <pid> <address>"
 *   write <token> <i>[,<i>...]                      write that content into those pages -> "ok"
 *                                                  (an <i> may also be a range a-b here)
 *   madvise <advice> <first> <count>                MADV_<advice> (mergeable, unmergeable,
 *                                                  dontneed, hugepage, nohugepage) -> "ok"
 *   fork <cmd_fifo> <reply_fifo>                    fork(); the parent answers "ok <child pid>",
 *                                                  the child opens the FIFOs, says "ok <pid>"
 *   exit                                            "ok", then _exit(0)
 *   ping                                            "pong <pid>"
 *
 * Errors answer "err <text>"; EOF on the command channel exits. Page contents are the tokens
 * of harness/scenario/tokens.py, byte for byte: one letter or digit / 0xNN (a page full of that
 * byte), zero, u:<k> ("ksm-harness unique page <k>\n" then zeros). Only the buffer is ever
 * madvised, so nothing else of this process is known to KSM.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HPAGE (2ul << 20) /* a PMD-mapped transparent huge page on x86-64 */
#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#define MADV_NOHUGEPAGE 15
#endif

static int rfd = 0, wfd = 1;
static char *inbuf;
static size_t inlen, incap, consumed;
static uint8_t *buf;      /* the buffer, once mapped */
static size_t buf_pages, page_size = 4096;
static char errmsg[256];

static void send_line(const char *text)
{
	size_t len = strlen(text);
	char *out = malloc(len + 1);
	if (!out)
		_exit(3);
	memcpy(out, text, len);
	out[len] = '\n';
	for (size_t off = 0; off < len + 1;) {
		ssize_t n = write(wfd, out + off, len + 1 - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			_exit(0); /* the agent is gone */
		off += (size_t)n;
	}
	free(out);
}

/* One request line (without its newline), or NULL at EOF. The caller frees nothing: the
 * returned pointer is valid until the next call. */
static char *read_line(void)
{
	if (consumed) {
		memmove(inbuf, inbuf + consumed, inlen - consumed);
		inlen -= consumed;
		consumed = 0;
	}
	for (;;) {
		char *nl = inlen ? memchr(inbuf, '\n', inlen) : NULL;
		if (nl) {
			*nl = 0;
			consumed = (size_t)(nl - inbuf) + 1;
			return inbuf;
		}
		if (incap - inlen < 65536) {
			incap = incap ? incap * 2 : 131072;
			inbuf = realloc(inbuf, incap);
			if (!inbuf)
				_exit(3);
		}
		ssize_t n = read(rfd, inbuf + inlen, incap - inlen);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return NULL;
		inlen += (size_t)n;
	}
}

static int fail(const char *fmt, const char *arg)
{
	snprintf(errmsg, sizeof(errmsg), fmt, arg);
	return -1;
}

/* A canonical token as tokens.normalize() writes it: -1 and errmsg when it is not one. A byte
 * fill sets *byte (0..255) and *unique = -1; a u-page sets *unique = k. */
static int parse_token(const char *t, int *byte, long long *unique)
{
	*unique = -1;
	if (!strcmp(t, "zero")) {
		*byte = 0;
		return 0;
	}
	if (t[0] && !t[1] && isalnum((unsigned char)t[0])) {
		*byte = (unsigned char)t[0];
		return 0;
	}
	if (t[0] == '0' && t[1] == 'x' && isxdigit((unsigned char)t[2]) &&
	    isxdigit((unsigned char)t[3]) && !t[4]) {
		*byte = (int)strtol(t + 2, NULL, 16);
		return 0;
	}
	if (t[0] == 'u' && t[1] == ':' && isdigit((unsigned char)t[2])) {
		char *end;
		errno = 0;
		*unique = strtoll(t + 2, &end, 10);
		if (!errno && !*end)
			return 0;
	}
	return fail("not a page token: '%.60s'", t);
}

static void page_bytes(uint8_t *dst, int byte, long long unique)
{
	if (unique < 0) {
		memset(dst, byte, page_size);
		return;
	}
	memset(dst, 0, page_size);
	snprintf((char *)dst, page_size, "ksm-harness unique page %lld\n", unique);
}

static int parse_count(const char *s, size_t *out)
{
	char *end;
	if (!isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end)
		return -1;
	*out = (size_t)v;
	return 0;
}

static int do_map(int argc, char **argv, char *out)
{
	size_t ps;
	int first = 2, huge = 0;
	if (buf)
		return fail("%s", "the buffer is already mapped");
	if (argc < 3 || parse_count(argv[1], &ps) || ps < 4096 || (ps & (ps - 1)))
		return fail("%s", "usage: map PAGE_SIZE [huge|nohuge] TOKEN*COUNT...");
	if (!strcmp(argv[2], "huge") || !strcmp(argv[2], "nohuge")) {
		huge = argv[2][0] == 'h';
		first = 3;
	}
	page_size = ps;
	size_t pages = 0;
	for (int i = first; i < argc; i++) {
		char *star = strrchr(argv[i], '*');
		size_t n = 1;
		if (star && (parse_count(star + 1, &n) || n < 1))
			return fail("bad repeat count in '%.60s'", argv[i]);
		pages += n;
	}
	if (pages == 0)
		return fail("%s", "map: no pages");
	size_t length = pages * ps, span = length + (huge ? HPAGE : 0);
	uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		return fail("mmap: %s", strerror(errno));
	uint8_t *start = raw;
	if (huge) { /* start on a 2 MiB boundary, as worker.py's Buffer does */
		start = (uint8_t *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1));
		if (start > raw)
			munmap(raw, (size_t)(start - raw));
		if (raw + span > start + length)
			munmap(start + length, (size_t)(raw + span - (start + length)));
	}
	/* Before the first write: a huge buffer faults in whole THPs, a nohuge one never does. */
	if (madvise(start, length, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
		return fail("madvise hugepage: %s", strerror(errno));
	size_t p = 0;
	for (int i = first; i < argc; i++) {
		char *star = strrchr(argv[i], '*');
		size_t n = 1;
		if (star) {
			*star = 0;
			parse_count(star + 1, &n);
		}
		int byte;
		long long unique;
		if (parse_token(argv[i], &byte, &unique))
			return -1;
		for (size_t j = 0; j < n; j++, p++)
			page_bytes(start + p * ps, byte, unique);
	}
	if (madvise(start, length, MADV_MERGEABLE))
		return fail("madvise mergeable: %s", strerror(errno));
	buf = start;
	buf_pages = pages;
	sprintf(out, "ok %d %lu", (int)getpid(), (unsigned long)(uintptr_t)start);
	return 0;
}

/* The next item of an index list "I,J-K,...": [*lo, *hi]; -1 when malformed. */
static int next_range(char **s, unsigned long long *lo, unsigned long long *hi)
{
	char *end;
	errno = 0;
	*lo = *hi = strtoull(*s, &end, 10);
	if (errno || end == *s)
		return -1;
	if (*end == '-') {
		char *from = end + 1;
		*hi = strtoull(from, &end, 10);
		if (errno || end == from || *hi < *lo)
			return -1;
	}
	if (*end && *end != ',')
		return -1;
	*s = *end ? end + 1 : end;
	return 0;
}

static int do_write(int argc, char **argv)
{
	int byte;
	long long unique;
	unsigned long long lo, hi;
	if (!buf)
		return fail("%s", "no buffer yet: send map first");
	if (argc != 3)
		return fail("%s", "usage: write TOKEN I[,I...] (I: a page or a range A-B)");
	if (parse_token(argv[1], &byte, &unique))
		return -1;
	/* Check every index first, so a bad one changes nothing. */
	for (char *s = argv[2]; *s;)
		if (next_range(&s, &lo, &hi) || hi >= buf_pages)
			return fail("bad page index list '%.60s'", argv[2]);
	for (char *s = argv[2]; *s;) {
		next_range(&s, &lo, &hi);
		for (unsigned long long i = lo; i <= hi; i++)
			page_bytes(buf + i * page_size, byte, unique);
	}
	return 0;
}

static int do_madvise(int argc, char **argv)
{
	static const struct { const char *name; int advice; } table[] = {
		{"mergeable", MADV_MERGEABLE},   {"unmergeable", MADV_UNMERGEABLE},
		{"dontneed", MADV_DONTNEED},     {"hugepage", MADV_HUGEPAGE},
		{"nohugepage", MADV_NOHUGEPAGE},
	};
	size_t first, count;
	if (!buf)
		return fail("%s", "no buffer yet: send map first");
	if (argc != 4 || parse_count(argv[2], &first) || parse_count(argv[3], &count) ||
	    first > buf_pages || count > buf_pages - first)
		return fail("%s", "usage: madvise ADVICE FIRST COUNT (inside the buffer)");
	for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
		if (strcmp(argv[1], table[i].name))
			continue;
		if (madvise(buf + first * page_size, count * page_size, table[i].advice))
			return fail("madvise: %s", strerror(errno));
		return 0;
	}
	return fail("unknown advice '%.40s'", argv[1]);
}

/* Returns 1 in the child (which has already greeted on its new channel). */
static int do_fork(int argc, char **argv, char *out)
{
	if (argc != 3)
		return fail("%s", "usage: fork CMD_FIFO REPLY_FIFO");
	pid_t pid = fork();
	if (pid < 0)
		return fail("fork: %s", strerror(errno));
	if (pid > 0) {
		sprintf(out, "ok %d", (int)pid);
		return 0;
	}
	/* Child: drop the parent's channel, take the FIFOs (opened by the agent O_RDWR, so
	 * neither open blocks). */
	int cmd = open(argv[1], O_RDONLY), reply = open(argv[2], O_WRONLY);
	if (cmd < 0 || reply < 0)
		_exit(4);
	close(rfd);
	close(wfd);
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0);
		dup2(null, 1);
		if (null > 1)
			close(null);
	}
	rfd = cmd;
	wfd = reply;
	inlen = consumed = 0; /* nothing the parent had buffered belongs to the child */
	sprintf(out, "ok %d", (int)getpid());
	send_line(out);
	return 1;
}

static void handle(char *line)
{
	static char *argv[1 << 16];
	char out[128] = "ok";
	int argc = 0, rc = 0;
	for (char *tok = strtok(line, " \t\r"); tok; tok = strtok(NULL, " \t\r")) {
		if (argc == (int)(sizeof(argv) / sizeof(argv[0]))) {
			send_line("err too many words");
			return;
		}
		argv[argc++] = tok;
	}
	if (argc == 0)
		return;
	const char *cmd = argv[0];
	if (!strcmp(cmd, "ping"))
		sprintf(out, "pong %d", (int)getpid());
	else if (!strcmp(cmd, "map"))
		rc = do_map(argc, argv, out);
	else if (!strcmp(cmd, "write"))
		rc = do_write(argc, argv);
	else if (!strcmp(cmd, "madvise"))
		rc = do_madvise(argc, argv);
	else if (!strcmp(cmd, "fork")) {
		rc = do_fork(argc, argv, out);
		if (rc == 1)
			return; /* the child greeted on its own channel */
	} else if (!strcmp(cmd, "exit")) {
		send_line("ok");
		_exit(0);
	} else
		rc = fail("unknown command '%.40s'", cmd);
	if (rc < 0) {
		char text[300];
		snprintf(text, sizeof(text), "err %s", errmsg);
		send_line(text);
	} else {
		send_line(out);
	}
}

int main(void)
{
	/* Fork children are reaped automatically, so an exited child never lingers as a zombie. */
	signal(SIGCHLD, SIG_IGN);
	signal(SIGPIPE, SIG_DFL);
	for (;;) {
		char *line = read_line();
		if (!line)
			_exit(0);
		handle(line);
	}
}
