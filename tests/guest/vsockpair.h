/*
 * Shared by vsockpair.c (control channel, helpers, main) and vsockpair_cases.c (the cases).
 * See the top of vsockpair.c for what the program does.
 */
#ifndef VSOCKPAIR_H
#define VSOCKPAIR_H

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

/* Bound on one blocking step of a case. */
#define OP_SECS 20
/* Bound on a control-channel read: longer than any case step of the other side. */
#define CTL_SECS 120
/* Bound on B's retries to reach A's control port while A boots. */
#define BOOT_SECS 90

#define KIB 1024u
/* Size of the shared receive buffer. */
#define RBUF (256 * KIB)

/* One case: the halves A (accepting side) and B (connecting side) run; 0 = pass. */
struct pcase {
    const char *name;
    int (*a)(void);
    int (*b)(void);
};
extern const struct pcase CASES[];
extern const size_t NCASES;

/* 'a' or 'b'. */
extern char role;
/* The other guest's CID, the control port, and the current case's own port. */
extern unsigned peer_cid, base_port, case_port;
/* The running kernel, e.g. 6 and 1 for "6.1.0-57-amd64". */
extern int kernel_major, kernel_minor;
/* Scratch receive buffer for the cases. */
extern unsigned char rbuf[RBUF];

double now_ms(void);
/* Records the first failure reason of the case; returns -1. */
int failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Appends a key=value word to the case's result line. */
void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *errname(int e);

/* Byte j of payload k, the same on both sides. */
unsigned char pat(unsigned k, size_t j);
int check_pat(const unsigned char *b, size_t n, unsigned k, size_t off, const char *what);

void set_timeouts(int fd, int secs);
/* Connected socket to the peer's `port`, or -1 with errno kept. */
int vconnect(int type, unsigned port);
/* Listening socket on `port`, or -1 (failure recorded). */
int vlisten(int type, unsigned port, int backlog);
/* Accepts one connection within OP_SECS, or -1 (failure recorded). */
int vaccept(int l);
int send_all(int fd, const void *buf, size_t n, int flags, const char *what);
int recv_all(int fd, void *buf, size_t n, const char *what);
int expect_eof(int fd, const char *what);

/* Control channel: one line out; wait for one exact line in (an END aborts). */
void ctl_send(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int ctl_expect(const char *want);

#endif
