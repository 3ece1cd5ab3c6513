/*
 * vsockpair: socket-level conformance checks between two guests of one sibling group
 * (tests/tests/guest_pair.rs). The same binary runs in both guests, built with `cc -static`
 * into the test initramfs by tests/guest/build.sh:
 *
 *   vsockpair a PEER_CID BASE_PORT    guest A: the accepting side of every case
 *   vsockpair b PEER_CID BASE_PORT    guest B: the connecting side
 *
 * A listens on BASE_PORT for a control connection; B connects to it (retrying while A boots)
 * and the two run the cases of CASES in lockstep over it: B names the case, both run their
 * half, both send "END <case>". Case k uses port BASE_PORT + 1 + k. Each side prints one line
 * per case on stdout (the serial console), which the host test parses:
 *
 *   @@ CASE <name> pass [key=value...]
 *   @@ CASE <name> fail <reason>
 *   @@ PAIRDONE role=<a|b> kernel=<release> pass=<n> fail=<n>
 *
 * A case passes when both sides say pass. Every blocking call is bounded (OP_SECS, CTL_SECS,
 * the kernel's 2 s connect timeout), so a daemon that loses a packet fails a case instead of
 * hanging the guest. The expected behaviour is that of Linux's own virtio-vsock transport.
 */
#include "vsockpair.h"

#include <signal.h>
#include <stdarg.h>
#include <sys/utsname.h>
#include <time.h>

char role;
unsigned peer_cid, base_port, case_port;
int kernel_major, kernel_minor;
static char kernel_release[65];

static int ctl = -1;
static char ctl_buf[1024];
static size_t ctl_len;
static int ctl_lost;    /* the control connection broke: stop */
static char ctl_why[64]; /* how it broke */
static int peer_ended;  /* the peer already sent END for the current case */

static char why[240];   /* first failure of the current case */
static char info[240];  /* key=value results of the current case */

unsigned char rbuf[RBUF];

double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int failf(const char *fmt, ...)
{
    if (!why[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, sizeof why, fmt, ap);
        va_end(ap);
    }
    return -1;
}

void note(const char *fmt, ...)
{
    size_t n = strlen(info);
    if (n + 2 >= sizeof info)
        return;
    if (n)
        info[n++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(info + n, sizeof info - n, fmt, ap);
    va_end(ap);
}

const char *errname(int e)
{
    switch (e) {
    case 0: return "none";
    case ECONNRESET: return "ECONNRESET";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EAGAIN: return "EAGAIN";
    case EPIPE: return "EPIPE";
    case EMSGSIZE: return "EMSGSIZE";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOTCONN: return "ENOTCONN";
    case EINTR: return "EINTR";
    default: return strerror(e);
    }
}

/* Byte j of payload k: the same on both sides, different for every case and offset. */
unsigned char pat(unsigned k, size_t j)
{
    return (unsigned char)(k * 131u + j * 7u + (j >> 9) * 3u + 1u);
}

int check_pat(const unsigned char *b, size_t n, unsigned k, size_t off, const char *what)
{
    for (size_t j = 0; j < n; j++)
        if (b[j] != pat(k, off + j))
            return failf("%s: byte %zu is %u, want %u", what, off + j, b[j], pat(k, off + j));
    return 0;
}

void set_timeouts(int fd, int secs)
{
    struct timeval tv = {.tv_sec = secs, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static struct sockaddr_vm vm_addr(unsigned cid, unsigned port)
{
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

/* A connected socket to the peer's case port, or -1 with errno kept. */
int vconnect(int type, unsigned port)
{
    int fd = socket(AF_VSOCK, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_timeouts(fd, OP_SECS);
    struct sockaddr_vm a = vm_addr(peer_cid, port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

int vlisten(int type, unsigned port, int backlog)
{
    int fd = socket(AF_VSOCK, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return failf("socket: %s", errname(errno));
    struct sockaddr_vm a = vm_addr(VMADDR_CID_ANY, port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, backlog) < 0) {
        failf("bind/listen %u: %s", port, errname(errno));
        close(fd);
        return -1;
    }
    return fd;
}

int send_all(int fd, const void *buf, size_t n, int flags, const char *what)
{
    const unsigned char *p = buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, flags | MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return failf("%s: send: %s with %zu bytes left", what, w < 0 ? errname(errno) : "0", n);
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int recv_all(int fd, void *buf, size_t n, const char *what)
{
    unsigned char *p = buf;
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return failf("%s: recv after %zu of %zu bytes: %s", what, got, n,
                         r < 0 ? errname(errno) : "EOF");
        got += (size_t)r;
    }
    return 0;
}

/* The next recv must report EOF (0 bytes). */
int expect_eof(int fd, const char *what)
{
    ssize_t r = recv(fd, rbuf, sizeof rbuf, 0);
    if (r != 0)
        return failf("%s: expected EOF, got %zd (%s)", what, r, r < 0 ? errname(errno) : "data");
    return 0;
}

/* ----- control channel ------------------------------------------------------------------ */

void ctl_send(const char *fmt, ...)
{
    char line[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || ctl_lost)
        return;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    const char *p = line;
    while (n > 0) {
        ssize_t w = send(ctl, p, (size_t)n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(ctl_why, sizeof ctl_why, "send: %s", w < 0 ? errname(errno) : "0");
            ctl_lost = 1;
            return;
        }
        p += w;
        n -= (int)w;
    }
}

/* The next control line, without its newline; -1 if the channel broke or timed out. */
static int ctl_line(char *out, size_t cap)
{
    for (;;) {
        char *nl = memchr(ctl_buf, '\n', ctl_len);
        if (nl) {
            size_t n = (size_t)(nl - ctl_buf);
            size_t k = n < cap - 1 ? n : cap - 1;
            memcpy(out, ctl_buf, k);
            out[k] = 0;
            ctl_len -= n + 1;
            memmove(ctl_buf, nl + 1, ctl_len);
            return 0;
        }
        if (ctl_lost || ctl_len == sizeof ctl_buf) {
            if (!ctl_lost)
                snprintf(ctl_why, sizeof ctl_why, "line too long");
            ctl_lost = 1;
            return -1;
        }
        ssize_t r = recv(ctl, ctl_buf + ctl_len, sizeof ctl_buf - ctl_len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(ctl_why, sizeof ctl_why, "recv: %s", r < 0 ? errname(errno) : "EOF");
            ctl_lost = 1;
            return -1;
        }
        ctl_len += (size_t)r;
    }
}

/* Waits for the control line `want`; an END from the peer means it gave up on the case. */
int ctl_expect(const char *want)
{
    char line[128];
    if (peer_ended)
        return failf("peer gave up before \"%s\"", want);
    if (ctl_line(line, sizeof line) < 0)
        return failf("control channel lost (%s) waiting for \"%s\"", ctl_why, want);
    if (!strcmp(line, want))
        return 0;
    if (!strncmp(line, "END ", 4)) {
        peer_ended = 1;
        return failf("peer gave up before \"%s\" (%s)", want, line);
    }
    return failf("control: got \"%s\", want \"%s\"", line, want);
}

/*
 * Accepts one connection within OP_SECS. The peer's END on the control channel while no
 * connection is queued means none will come (B sends END only after its connects returned,
 * and a returned connect is already in the accept queue): fail at once then.
 */
int vaccept(int l)
{
    double deadline = now_ms() + OP_SECS * 1e3;
    for (;;) {
        struct pollfd p[2] = {{.fd = l, .events = POLLIN}, {.fd = ctl, .events = POLLIN}};
        int left = (int)(deadline - now_ms());
        int watch_ctl = !peer_ended && !ctl_lost;
        /* A whole line already buffered would not wake poll: look at the listener only. */
        int buffered = watch_ctl && memchr(ctl_buf, '\n', ctl_len) != NULL;
        int r = left > 0 || buffered
                    ? poll(p, watch_ctl && !buffered ? 2 : 1, buffered ? 0 : left)
                    : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r > 0 && (p[0].revents & POLLIN))
            break;
        if (r <= 0 && !buffered)
            return failf("no connection to accept within %d s", OP_SECS);
        char line[128];
        if (ctl_line(line, sizeof line) < 0)
            continue;
        if (strncmp(line, "END ", 4) != 0)
            return failf("control: got \"%s\" while waiting for a connection", line);
        peer_ended = 1;
        return failf("the peer gave up before connecting (%s)", line);
    }
    int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0)
        return failf("accept: %s", errname(errno));
    set_timeouts(c, OP_SECS);
    return c;
}

static int parse_kernel(void)
{
    struct utsname u;
    if (uname(&u) < 0)
        return -1;
    snprintf(kernel_release, sizeof kernel_release, "%s", u.release);
    if (sscanf(u.release, "%d.%d", &kernel_major, &kernel_minor) != 2)
        return -1;
    return 0;
}

/* A: accept the control connection; B: connect to it, retrying while A boots. */
static int ctl_open(void)
{
    if (role == 'a') {
        int l = vlisten(SOCK_STREAM, base_port, 4);
        if (l < 0)
            return -1;
        printf("@@ PAIRLISTEN port=%u\n", base_port);
        struct pollfd p = {.fd = l, .events = POLLIN};
        if (poll(&p, 1, BOOT_SECS * 1000) <= 0)
            return failf("B did not connect within %d s", BOOT_SECS);
        ctl = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        close(l);
        if (ctl < 0)
            return failf("accept: %s", errname(errno));
    } else {
        double deadline = now_ms() + BOOT_SECS * 1e3;
        int tries = 0;
        for (;;) {
            tries++;
            ctl = vconnect(SOCK_STREAM, base_port);
            if (ctl >= 0)
                break;
            if (now_ms() > deadline)
                return failf("control connect: %s after %d tries", errname(errno), tries);
            usleep(200 * 1000);
        }
    }
    set_timeouts(ctl, CTL_SECS);
    ctl_send("HELLO %c %s", role, kernel_release);
    char line[128];
    if (ctl_line(line, sizeof line) < 0 || strncmp(line, "HELLO ", 6) != 0)
        return failf("control handshake failed");
    printf("@@ PAIRUP role=%c peer=\"%s\"\n", role, line + 6);
    return 0;
}

/* Runs one case on this side and brings both sides back in step. */
static int run_case(unsigned k)
{
    const struct pcase *c = &CASES[k];
    why[0] = info[0] = 0;
    peer_ended = 0;
    case_port = base_port + 1 + k;
    char line[128], want[64];
    snprintf(want, sizeof want, "CASE %s", c->name);
    double t0 = now_ms();
    int rc;
    if (role == 'b') {
        ctl_send("%s", want);
        rc = c->b();
    } else {
        rc = ctl_expect(want);
        if (rc == 0)
            rc = c->a();
    }
    ctl_send("END %s %s", c->name, rc ? "fail" : "pass");
    snprintf(want, sizeof want, "END %s ", c->name);
    while (!peer_ended && !ctl_lost) {
        if (ctl_line(line, sizeof line) < 0)
            break;
        if (!strncmp(line, want, strlen(want)))
            peer_ended = 1;
    }
    if (!peer_ended && !rc)
        rc = failf("control channel lost (%s) at the end of the case", ctl_why);
    note("ms=%.0f", now_ms() - t0);
    if (rc)
        printf("@@ CASE %s fail %s%s%s\n", c->name, why[0] ? why : "(no reason)",
               info[0] ? " | " : "", info);
    else
        printf("@@ CASE %s pass%s%s\n", c->name, info[0] ? " " : "", info);
    return rc;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (argc != 4 || (strcmp(argv[1], "a") && strcmp(argv[1], "b"))) {
        fprintf(stderr, "usage: vsockpair a|b PEER_CID BASE_PORT\n");
        return 2;
    }
    role = argv[1][0];
    peer_cid = (unsigned)strtoul(argv[2], NULL, 10);
    base_port = (unsigned)strtoul(argv[3], NULL, 10);
    if (parse_kernel() < 0) {
        printf("@@ PAIRDONE role=%c kernel=unknown pass=0 fail=%zu\n", role, NCASES);
        return 1;
    }
    int pass = 0, fail = 0;
    if (ctl_open() < 0) {
        for (size_t k = 0; k < NCASES; k++)
            printf("@@ CASE %s fail no control connection: %s\n", CASES[k].name, why);
        fail = (int)NCASES;
    } else {
        for (unsigned k = 0; k < NCASES; k++) {
            if (ctl_lost) {
                printf("@@ CASE %s fail control channel lost in an earlier case\n",
                       CASES[k].name);
                fail++;
                continue;
            }
            if (run_case(k))
                fail++;
            else
                pass++;
        }
        close(ctl);
    }
    printf("@@ PAIRDONE role=%c kernel=%s pass=%d fail=%d\n", role, kernel_release, pass, fail);
    return fail ? 1 : 0;
}
