/* The stand-in's "qemu" process: what the daemon's pidfd, identity check and
 * peer checks see for a stand-in VM (harness/standin.py serves the VM's
 * sockets from one hub process; each VM's liveness is one of these).
 *
 * usage: holder FD,FD,... CTLFD ARGS...   (ARGS: "-uuid <uuid> ...", read by
 * the daemon's identity check off /proc/<pid>/cmdline)
 *
 * It listen()s on the inherited unix sockets (so the kernel names it as
 * their server, as qemu is for its own), says "up" on stdout, and then holds
 * the TCP listener the hub passes it over CTLFD (SCM_RIGHTS, one at a time,
 * each replacing the last; a message with none: hold none), as qemu holds the VNC listener it was given with
 * display-update: a restarted daemon then finds the listening socket among
 * the "qemu"'s fds and adopts the console.  Exits when stdin closes.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    char *list = strdup(argv[1]);
    for (char *tok = strtok(list, ","); tok != NULL; tok = strtok(NULL, ","))
        listen(atoi(tok), 64);
    int ctl = atoi(argv[2]);
    int held = -1;
    printf("up\n");
    fflush(stdout);
    struct pollfd fds[2] = {{0, POLLIN, 0}, {ctl, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) continue;
        if (fds[0].revents) {
            char buf[64];
            if (read(0, buf, sizeof buf) <= 0) return 0;
        }
        if (fds[1].revents) {
            char byte;
            char cbuf[CMSG_SPACE(sizeof(int))];
            struct iovec iov = {&byte, 1};
            struct msghdr msg = {0};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf;
            msg.msg_controllen = sizeof cbuf;
            ssize_t n = recvmsg(ctl, &msg, 0);
            if (n <= 0) {
                fds[1].fd = -1; /* the hub let go: hold what we have */
                continue;
            }
            /* A message with an fd: hold it instead; without: hold none. */
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            if (held >= 0) close(held);
            held = -1;
            if (c != NULL && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                memcpy(&held, CMSG_DATA(c), sizeof held);
        }
    }
}
