/* A TLS client linked statically against OpenSSL (libssl.a/libcrypto.a), as vendored builds
 * are: its SSL_* functions live in the executable, not in libssl.so.
 * usage: ssl_client IP PORT SNI CAFILE DELAY_MS REQUEST
 * Waits DELAY_MS after start, sends REQUEST, reads the response to EOF; exits 0 on a 200. */
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s IP PORT SNI CAFILE DELAY_MS REQUEST\n", argv[0]);
        return 2;
    }
    usleep(atoi(argv[5]) * 1000);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        perror("connect");
        return 1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_load_verify_locations(ctx, argv[4], NULL);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL *ssl = SSL_new(ctx);
    SSL_set_tlsext_host_name(ssl, argv[3]);
    SSL_set1_host(ssl, argv[3]);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    const char *req = argv[6];
    if (SSL_write(ssl, req, (int)strlen(req)) <= 0) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    char buf[4096], all[65536];
    size_t used = 0;
    int n;
    while ((n = SSL_read(ssl, buf, sizeof buf)) > 0) {
        if (used + n < sizeof all) {
            memcpy(all + used, buf, n);
            used += n;
        }
    }
    all[used] = 0;
    SSL_shutdown(ssl);
    close(fd);
    return strstr(all, " 200 ") ? 0 : 1;
}
