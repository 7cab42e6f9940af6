/* Load for hostwall's packet benchmarks, at C speed so that the generator's own cost
 * does not hide the firewall's. Every loop is bounded in count and in time.
 *
 *   loadgen server PORT SECONDS
 *       accept and close at once, on 0.0.0.0:PORT, for at most SECONDS
 *   loadgen connect ADDRESS PORT SECONDS MAX_CONNECTIONS PROCESSES
 *       PROCESSES processes open and reset TCP connections (SYN, SYN/ACK, ACK, RST) as
 *       fast as they can; prints "<connections> <failures> <seconds>"
 *   loadgen udp ADDRESS PORT COUNT RATE SECONDS
 *       COUNT datagrams of 32 bytes at RATE per second (0: as fast as possible);
 *       prints "<sent> <seconds>"
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in address_of(const char *text, int port) {
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port);
    if (inet_pton(AF_INET, text, &sin.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", text);
        exit(2);
    }
    return sin;
}

static int server(int port, double seconds) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in sin = address_of("0.0.0.0", port);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) || listen(fd, 4096)) {
        perror("listen");
        return 1;
    }
    /* SIGALRM ends the process even while accept() blocks. */
    alarm((unsigned)seconds + 1);
    printf("listening\n");
    fflush(stdout);
    double deadline = now() + seconds;
    while (now() < deadline) {
        int c = accept(fd, NULL, NULL);
        if (c >= 0)
            close(c);
    }
    return 0;
}

static int connector(const char *host, int port, double seconds, long max_connections, int processes) {
    struct sockaddr_in sin = address_of(host, port);
    int pipes[2];
    if (pipe(pipes))
        return 1;
    double started = now();
    for (int p = 0; p < processes; p++) {
        if (fork() == 0) {
            long done = 0, failed = 0, limit = max_connections / processes;
            double deadline = started + seconds;
            struct linger reset = {1, 0};
            struct timeval wait = {1, 0};
            while (done + failed < limit && now() < deadline) {
                int fd = socket(AF_INET, SOCK_STREAM, 0);
                /* A dropped SYN would otherwise block connect() for a minute. */
                setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &wait, sizeof wait);
                /* Close with a reset: no TIME_WAIT, so ports never run out. */
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
                if (connect(fd, (struct sockaddr *)&sin, sizeof sin) == 0)
                    done++;
                else
                    failed++;
                close(fd);
            }
            long counts[2] = {done, failed};
            if (write(pipes[1], counts, sizeof counts) != sizeof counts)
                _exit(1);
            _exit(0);
        }
    }
    close(pipes[1]);
    long total = 0, failures = 0, counts[2];
    while (read(pipes[0], counts, sizeof counts) == sizeof counts) {
        total += counts[0];
        failures += counts[1];
    }
    while (wait(NULL) > 0)
        ;
    printf("%ld %ld %.6f\n", total, failures, now() - started);
    return 0;
}

static int udp(const char *host, int port, long count, double rate, double seconds) {
    struct sockaddr_in sin = address_of(host, port);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    char payload[32] = "hostwall benchmark flood";
    long sent = 0;
    double started = now(), deadline = started + seconds;
    while (sent < count) {
        double t = now();
        if (t >= deadline)
            break;
        long due = rate > 0 ? (long)((t - started) * rate) + 1 : count;
        if (due > count)
            due = count;
        if (sent >= due) {
            struct timespec pause = {0, 100000};
            nanosleep(&pause, NULL);
            continue;
        }
        while (sent < due) {
            if (sendto(fd, payload, sizeof payload, 0, (struct sockaddr *)&sin, sizeof sin) < 0) {
                if (errno != ENOBUFS && errno != EAGAIN)
                    break;
                continue;
            }
            sent++;
            if ((sent & 1023) == 0 && now() >= deadline)
                break;
        }
    }
    printf("%ld %.6f\n", sent, now() - started);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "server"))
        return server(atoi(argv[2]), atof(argv[3]));
    if (argc == 7 && !strcmp(argv[1], "connect"))
        return connector(argv[2], atoi(argv[3]), atof(argv[4]), atol(argv[5]), atoi(argv[6]));
    if (argc == 7 && !strcmp(argv[1], "udp"))
        return udp(argv[2], atoi(argv[3]), atol(argv[4]), atof(argv[5]), atof(argv[6]));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return 2;
}
