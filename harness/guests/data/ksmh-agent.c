/*
 * ksmh-agent: the in-guest agent and memory allocator of ksm-harness.
 *
 * Runs as PID 1's successor in a busybox initramfs (the init script execs it). It opens the
 * virtio-serial port named "org.ksmh.agent", writes "ready ..." (the write blocks until the
 * host connects, so the first client always sees it), then answers one request per line:
 *
 *   request:  ID COMMAND ARGS...          ID = [A-Za-z0-9_.-]{1,32}
 *   reply:    ID ok KEY=VALUE...          or   ID err MESSAGE
 *   malformed requests (no valid id, overlong line) get "- err MESSAGE"; nothing hangs.
 *
 * Commands: ping | info | fill NAME SIZE PATTERN | verify NAME | rewrite NAME FRACTION [SEED]
 *           | hold NAME SECONDS | digest NAME | poke NAME OFFSET BYTE | free NAME | poweroff
 * Patterns (deterministic per guest index, read from ksmh.index= on the kernel command line):
 *   byte:V | zero | random:SEED | tail96:SEED | mix:SEED:common=P,zero=Q
 *
 * Memory is anonymous private mmap memory, written page by page, so the host sees it as the
 * guest's RAM pages; identical content across guests is what host KSM merges.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

/*
 * Built with -DKSMH_AGENT_STDIO (tests only: tests/unit/test_agent_protocol_fuzz.py), the agent
 * reads requests on stdin and replies on stdout, and refuses what would be harmful on a host:
 * poweroff only exits, fills are capped at STDIO_FILL_MAX bytes, holds at 0.1 s.
 */
#define STDIO_FILL_MAX (16u << 20)
#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAXREG 16
#define LINEMAX 1024
#define PORT_NAME "org.ksmh.agent"
#define VERSION "1"

enum kind { P_BYTE, P_ZERO, P_RANDOM, P_TAIL96, P_MIX };

struct pattern {
	enum kind kind;
	unsigned value;     /* byte:V */
	uint64_t seed;      /* random, tail96, mix */
	unsigned common;    /* mix: percent identical across guests */
	unsigned zero;      /* mix: percent zero pages */
};

struct region {
	int used;
	char name[33];
	uint8_t *mem;
	size_t pages;
	struct pattern pat;
	uint32_t *gen;      /* 0: page holds the pattern; g > 0: rewritten in rewrite round g */
	uint32_t rounds;
	uint64_t base_common[WORDS]; /* same in every guest */
	uint64_t base_guest[WORDS];  /* unique to this guest */
	uint64_t base_rewrite[WORDS];
};

static struct region regions[MAXREG];
static unsigned long guest_index;
static int port = -1;

/* splitmix64 finaliser: a cheap, well-mixed hash of a 64-bit key. */
static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static void random_words(uint64_t *dst, size_t n, uint64_t key)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = mix64(key ^ mix64(i + 1));
}

static void logmsg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("ksmh-agent: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static void write_all(const char *buf, size_t len)
{
	while (len > 0) {
#ifdef KSMH_AGENT_STDIO
		ssize_t n = write(1, buf, len);
#else
		ssize_t n = write(port, buf, len);
#endif
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			logmsg("write failed: %s", strerror(errno));
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void reply(const char *id, const char *fmt, ...)
{
	char out[LINEMAX + 128];
	int off = snprintf(out, sizeof(out), "%s ", id);
	va_list ap;
	va_start(ap, fmt);
	off += vsnprintf(out + off, sizeof(out) - (size_t)off - 2, fmt, ap);
	va_end(ap);
	if (off > (int)sizeof(out) - 2)
		off = (int)sizeof(out) - 2;
	out[off++] = '\n';
	write_all(out, (size_t)off);
}

static int parse_u64(const char *s, uint64_t *out, int base)
{
	char *end;
	if (!*s || *s == '-')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, base);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/*
 * SIZE: the harness's one size grammar (harness/units.py), integers only: N, NB, NK or NKiB,
 * NM or NMiB, NG or NGiB, NT or NTiB; binary multiples, unit letters in any case. The decimal
 * spellings KB/MB/GB/TB are refused (they mean powers of 1000 elsewhere). The size must be a
 * positive multiple of a page, at most 1 TiB.
 */
static int parse_size(const char *s, size_t *out)
{
	char *end;
	if (!isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno)
		return -1;
	unsigned long long mul = 1;
	if (*end) {
		switch (toupper((unsigned char)*end)) {
		case 'B': mul = 1; break;
		case 'K': mul = 1ULL << 10; break;
		case 'M': mul = 1ULL << 20; break;
		case 'G': mul = 1ULL << 30; break;
		case 'T': mul = 1ULL << 40; break;
		default: return -1;
		}
		end++;
		if (mul > 1 && *end && strcasecmp(end, "iB"))
			return -1; /* KB, MB, ...: decimal spellings are refused */
		if (mul == 1 && *end)
			return -1;
	}
	if (v == 0 || v > (1ULL << 40) / mul || (v * mul) % PAGE)
		return -1;
	*out = (size_t)(v * mul);
	return 0;
}

static int parse_pattern(const char *s, struct pattern *p, char *err, size_t errlen)
{
	memset(p, 0, sizeof(*p));
	uint64_t v;
	if (!strncmp(s, "byte:", 5)) {
		if (parse_u64(s + 5, &v, 0) || v > 255)
			goto bad;
		p->kind = P_BYTE;
		p->value = (unsigned)v;
	} else if (!strcmp(s, "zero")) {
		p->kind = P_ZERO;
	} else if (!strncmp(s, "random:", 7) || !strncmp(s, "tail96:", 7)) {
		if (parse_u64(s + 7, &p->seed, 0))
			goto bad;
		p->kind = s[0] == 'r' ? P_RANDOM : P_TAIL96;
	} else if (!strncmp(s, "mix:", 4)) {
		char seed[32];
		unsigned c, z;
		int n = 0;
		if (sscanf(s + 4, "%31[0-9xa-fA-F]:common=%u,zero=%u%n", seed, &c, &z, &n) != 3 ||
		    s[4 + n] || parse_u64(seed, &p->seed, 0) || c > 100 || z > 100 - c) /* no wrap */
			goto bad;
		p->kind = P_MIX;
		p->common = c;
		p->zero = z;
	} else {
		goto bad;
	}
	return 0;
bad:
	snprintf(err, errlen, "bad pattern '%s' (byte:V zero random:SEED tail96:SEED "
		 "mix:SEED:common=P,zero=Q)", s);
	return -1;
}

static void prepare_bases(struct region *r)
{
	uint64_t s = r->pat.seed;
	random_words(r->base_common, WORDS, mix64(s ^ 0x636f6d6d6f6eULL));
	random_words(r->base_guest, WORDS, mix64(s ^ mix64(guest_index + 0x1000)));
	random_words(r->base_rewrite, WORDS, mix64(s ^ mix64(guest_index + 0x2000) ^ 0x7265ULL));
}

/* The expected content of page p of region r, written to dst. */
static void expected_page(const struct region *r, size_t p, uint8_t *dst)
{
	uint64_t *w = (uint64_t *)dst;
	if (r->gen[p]) {
		memcpy(dst, r->base_rewrite, PAGE);
		w[0] = p;
		w[1] = r->gen[p];
		return;
	}
	switch (r->pat.kind) {
	case P_BYTE:
		memset(dst, (int)r->pat.value, PAGE);
		return;
	case P_ZERO:
		memset(dst, 0, PAGE);
		return;
	case P_RANDOM: /* tp-qemu: one random page, one word replaced by the page number */
		memcpy(dst, r->base_guest, PAGE);
		w[p % WORDS] = p;
		return;
	case P_TAIL96: /* identical except the last 96 bytes (12 words) */
		memcpy(dst, r->base_common, PAGE - 96);
		random_words(w + WORDS - 12, 12, mix64(r->pat.seed ^ mix64(guest_index)) ^ mix64(p));
		return;
	case P_MIX: {
		unsigned c = (unsigned)(mix64(r->pat.seed ^ mix64(p ^ 0x6d6978ULL)) % 100);
		if (c < r->pat.common) {
			memcpy(dst, r->base_common, PAGE);
			w[p % WORDS] = p;
		} else if (c < r->pat.common + r->pat.zero) {
			memset(dst, 0, PAGE);
		} else {
			memcpy(dst, r->base_guest, PAGE);
			w[p % WORDS] = p;
		}
		return;
	}
	}
}

static struct region *find_region(const char *name)
{
	for (int i = 0; i < MAXREG; i++)
		if (regions[i].used && !strcmp(regions[i].name, name))
			return &regions[i];
	return NULL;
}

static size_t free_region(struct region *r)
{
	size_t pages = r->pages;
	munmap(r->mem, r->pages * PAGE);
	munmap(r->gen, r->pages * sizeof(uint32_t));
	memset(r, 0, sizeof(*r));
	return pages;
}

static long mem_available_kib(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[128];
	long kib = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void cmd_fill(const char *id, int argc, char **argv)
{
	char err[160];
	size_t size;
	struct pattern pat;
	if (argc != 4 || strlen(argv[1]) > 32) {
		reply(id, "err usage: fill NAME SIZE PATTERN");
		return;
	}
	if (parse_size(argv[2], &size)
#ifdef KSMH_AGENT_STDIO
	    || size > STDIO_FILL_MAX
#endif
	) {
		reply(id, "err bad size '%.40s' (N bytes, or N with K/KiB, M/MiB, G/GiB or T/TiB: "
		      "binary; MB etc. are refused; a multiple of %u)", argv[2], PAGE);
		return;
	}
	if (parse_pattern(argv[3], &pat, err, sizeof(err))) {
		reply(id, "err %s", err);
		return;
	}
	/*
	 * Refuse what would OOM the guest: the agent is init, so an OOM would panic it. The region
	 * this fill replaces counts as available (its pages are all resident), but it is freed only
	 * once the fill is accepted: a refused fill leaves it as it was.
	 */
	struct region *r = find_region(argv[1]);
	long avail = mem_available_kib();
	long long reclaim = r ? (long long)(r->pages * (PAGE / 1024)) : 0;
	if (avail >= 0 && (long long)(size / 1024) + 16 * 1024 > avail + reclaim) {
		reply(id, "err %zu bytes requested but only %ld KiB available in the guest", size, avail);
		return;
	}
	if (r)
		free_region(r); /* fill replaces a region of the same name */
	for (r = regions; r < regions + MAXREG && r->used; r++)
		;
	if (r == regions + MAXREG) {
		reply(id, "err too many regions (max %d)", MAXREG);
		return;
	}
	size_t pages = size / PAGE;
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *gen = mmap(NULL, pages * sizeof(uint32_t), PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || gen == MAP_FAILED) {
		int e = errno;
		if (mem != MAP_FAILED)
			munmap(mem, size);
		if (gen != MAP_FAILED)
			munmap(gen, pages * sizeof(uint32_t));
		reply(id, "err mmap %zu bytes: %s", size, strerror(e));
		return;
	}
	double t0 = now_ms();
	r->used = 1;
	snprintf(r->name, sizeof(r->name), "%s", argv[1]);
	r->mem = mem;
	r->gen = gen;
	r->pages = pages;
	r->pat = pat;
	prepare_bases(r);
	for (size_t p = 0; p < pages; p++)
		expected_page(r, p, r->mem + p * PAGE);
	reply(id, "ok region=%s pages=%zu bytes=%zu ms=%.0f", r->name, pages, size, now_ms() - t0);
}

static struct region *region_arg(const char *id, int argc, char **argv, int want, const char *usage)
{
	if (argc != want && !(want < 0 && (argc == -want || argc == -want + 1))) {
		reply(id, "err usage: %s", usage);
		return NULL;
	}
	struct region *r = find_region(argv[1]);
	if (!r)
		reply(id, "err no region '%s'", argv[1]);
	return r;
}

static void cmd_verify(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 2, "verify NAME");
	static uint8_t page[PAGE];
	if (!r)
		return;
	size_t bad_bytes = 0, bad_pages = 0;
	for (size_t p = 0; p < r->pages; p++) {
		const uint8_t *m = r->mem + p * PAGE;
		expected_page(r, p, page);
		if (!memcmp(m, page, PAGE))
			continue;
		bad_pages++;
		for (size_t i = 0; i < PAGE; i++)
			bad_bytes += m[i] != page[i];
	}
	reply(id, "ok mismatched=%zu bad_pages=%zu pages=%zu", bad_bytes, bad_pages, r->pages);
}

static void cmd_rewrite(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, -3, "rewrite NAME FRACTION [SEED]");
	if (!r)
		return;
	char *end;
	double frac = strtod(argv[2], &end);
	uint64_t seed = 0;
	/* Written as !(in range) so that "nan" is refused too. */
	if (*end || !(frac >= 0 && frac <= 1) || (argc == 4 && parse_u64(argv[3], &seed, 0))) {
		reply(id, "err usage: rewrite NAME FRACTION [SEED] (FRACTION in 0..1)");
		return;
	}
	r->rounds++;
	uint64_t threshold = (uint64_t)(frac * 1e6);
	size_t n = 0;
	for (size_t p = 0; p < r->pages; p++) {
		if (mix64(seed ^ mix64(p) ^ ((uint64_t)r->rounds << 40)) % 1000000 >= threshold)
			continue;
		r->gen[p] = r->rounds;
		expected_page(r, p, r->mem + p * PAGE);
		n++;
	}
	reply(id, "ok rewritten=%zu pages=%zu round=%u", n, r->pages, r->rounds);
}

static void cmd_hold(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 3, "hold NAME SECONDS");
	if (!r)
		return;
	char *end;
	double s = strtod(argv[2], &end);
	if (*end || !(s >= 0 && s <= 86400)) { /* !(in range): refuses "nan" */
		reply(id, "err bad SECONDS '%s'", argv[2]);
		return;
	}
#ifdef KSMH_AGENT_STDIO
	if (s > 0.1)
		s = 0.1;
#endif
	/* Holding = keeping the memory mapped and untouched for a while, then answering. */
	struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
	reply(id, "ok region=%s pages=%zu held=%s", r->name, r->pages, argv[2]);
}

/* FNV-1a over the region: lets tests compare contents across guests without reading them. */
static void cmd_digest(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 2, "digest NAME");
	if (!r)
		return;
	uint64_t h = 0xcbf29ce484222325ULL;
	const uint64_t *w = (const uint64_t *)r->mem;
	for (size_t i = 0; i < r->pages * WORDS; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	reply(id, "ok hash=%016llx pages=%zu", (unsigned long long)h, r->pages);
}

/* Corrupt one byte on purpose: how tests prove that verify can fail. */
static void cmd_poke(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 4, "poke NAME OFFSET BYTE");
	uint64_t off, val;
	if (!r)
		return;
	if (parse_u64(argv[2], &off, 0) || off >= r->pages * PAGE || parse_u64(argv[3], &val, 0) ||
	    val > 255) {
		reply(id, "err usage: poke NAME OFFSET BYTE (OFFSET < region size, BYTE 0..255)");
		return;
	}
	r->mem[off] = (uint8_t)val;
	reply(id, "ok region=%s offset=%llu", r->name, (unsigned long long)off);
}

static void cmd_info(const char *id)
{
	char names[MAXREG * 34 + 1] = "";
	size_t total = 0;
	for (int i = 0; i < MAXREG; i++) {
		if (!regions[i].used)
			continue;
		if (names[0])
			strcat(names, ",");
		strcat(names, regions[i].name);
		total += regions[i].pages;
	}
	reply(id, "ok index=%lu version=" VERSION " pagesize=%u mem_available_kib=%ld "
	      "regions=%s region_pages=%zu", guest_index, PAGE, mem_available_kib(),
	      names[0] ? names : "-", total);
}

static int valid_id(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > 32)
		return 0;
	for (; *s; s++)
		if (!isalnum((unsigned char)*s) && !strchr("_.-", *s))
			return 0;
	return 1;
}

static void handle(char *line)
{
	char *argv[8];
	int argc = 0;
	for (char *tok = strtok(line, " \t\r"); tok; tok = strtok(NULL, " \t\r")) {
		if (argc == 8) {
			reply("-", "err too many arguments");
			return;
		}
		argv[argc++] = tok;
	}
	if (argc == 0)
		return; /* blank lines are ignored, so a bare newline never costs a reply */
	if (!valid_id(argv[0])) {
		reply("-", "err malformed request: id must be [A-Za-z0-9_.-]{1,32}");
		return;
	}
	const char *id = argv[0];
	if (argc < 2) {
		reply(id, "err malformed request: missing command");
		return;
	}
	const char *cmd = argv[1];
	argc--;
	char **args = argv + 1;
	if (!strcmp(cmd, "ping"))
		reply(id, "ok pong");
	else if (!strcmp(cmd, "info"))
		cmd_info(id);
	else if (!strcmp(cmd, "fill"))
		cmd_fill(id, argc, args);
	else if (!strcmp(cmd, "verify"))
		cmd_verify(id, argc, args);
	else if (!strcmp(cmd, "rewrite"))
		cmd_rewrite(id, argc, args);
	else if (!strcmp(cmd, "hold"))
		cmd_hold(id, argc, args);
	else if (!strcmp(cmd, "digest"))
		cmd_digest(id, argc, args);
	else if (!strcmp(cmd, "poke"))
		cmd_poke(id, argc, args);
	else if (!strcmp(cmd, "free")) {
		struct region *r = region_arg(id, argc, args, 2, "free NAME");
		if (r)
			reply(id, "ok freed_pages=%zu", free_region(r));
	} else if (!strcmp(cmd, "poweroff")) {
		reply(id, "ok poweroff");
#ifdef KSMH_AGENT_STDIO
		exit(0);
#else
		sync();
		reboot(RB_POWER_OFF);
#endif
	} else
		reply(id, "err unknown command '%.40s' (ping info fill verify rewrite hold digest "
		      "poke free poweroff)", cmd);
}

static void read_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		return;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = 0;
	char *p = strstr(buf, "ksmh.index=");
	if (p)
		guest_index = strtoul(p + strlen("ksmh.index="), NULL, 10);
}

#ifndef KSMH_AGENT_STDIO
/* Find /dev/vportNpM whose /sys/class/virtio-ports/<dev>/name is PORT_NAME. */
static int open_port(void)
{
	for (int tries = 0; tries < 600; tries++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char path[300], name[64] = "";
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
			int fd = open(path, O_RDONLY);
			if (fd < 0)
				continue;
			ssize_t n = read(fd, name, sizeof(name) - 1);
			close(fd);
			if (n > 0 && name[n - 1] == '\n')
				name[n - 1] = 0;
			if (strcmp(name, PORT_NAME))
				continue;
			snprintf(path, sizeof(path), "/dev/%s", e->d_name);
			fd = open(path, O_RDWR);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		usleep(100000);
	}
	return -1;
}
#endif

int main(void)
{
	static char buf[LINEMAX + 1];
	size_t len = 0;
	int discarding = 0;

	setvbuf(stderr, NULL, _IONBF, 0);
	read_cmdline();
#ifdef KSMH_AGENT_STDIO
	port = 0;
#else
	port = open_port();
#endif
	if (port < 0) {
		logmsg("no virtio-serial port named " PORT_NAME "; giving up");
		return 1;
	}
	logmsg("index %lu, port open, saying ready", guest_index);
	reply("ready", "index=%lu version=" VERSION " pagesize=%u", guest_index, PAGE);
	for (;;) {
		struct pollfd pfd = {.fd = port, .events = POLLIN};
		int rc = poll(&pfd, 1, 1000);
		if (rc <= 0)
			continue;
		ssize_t n = (pfd.revents & POLLIN) ? read(port, buf + len, LINEMAX - len) : 0;
#ifdef KSMH_AGENT_STDIO
		if (n == 0 && !(pfd.revents & POLLIN))
			exit(0); /* stdin closed: the test is done */
#endif
		if (n <= 0) {
			/*
			 * EOF / POLLHUP: no host connected right now; wait for the next client. Drop
			 * what the last one left unfinished, or it would prefix the next client's
			 * first request and that request would never get its reply.
			 */
			if (n == 0) {
				len = 0;
				discarding = 0;
			}
			usleep(100000);
			continue;
		}
		len += (size_t)n;
		char *start = buf, *nl;
		while ((nl = memchr(start, '\n', len - (size_t)(start - buf)))) {
			*nl = 0;
			if (discarding)
				discarding = 0; /* end of an overlong line, already answered */
			else
				handle(start);
			start = nl + 1;
		}
		len -= (size_t)(start - buf);
		memmove(buf, start, len);
		if (len == LINEMAX) {
			if (!discarding)
				reply("-", "err malformed request: line longer than %d bytes", LINEMAX - 1);
			discarding = 1;
			len = 0;
		}
	}
}
