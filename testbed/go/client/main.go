// Go HTTPS client for the live tests: GET with `Authorization: Bearer $GO_TOKEN` through
// crypto/tls (no cgo, no OpenSSL), the host name resolved to -addr.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	addr := flag.String("addr", "", "ip:port every connection goes to")
	ca := flag.String("ca", "", "PEM file of the server certificate to trust")
	url := flag.String("url", "https://server.test/", "URL to GET")
	n := flag.Int("n", 1, "requests to send, one after the other on one connection")
	wait := flag.Bool("wait-stdin", false,
		"read a line from stdin before the first request, and stdin's end before exiting")
	flag.Parse()
	stdin := bufio.NewReader(os.Stdin)
	if *wait {
		// Lets a test start the process, have the monitor find it, then trigger the request.
		stdin.ReadString('\n')
	}
	pem, err := os.ReadFile(*ca)
	if err != nil {
		panic(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		panic("no certificate in " + *ca)
	}
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, network, *addr)
		},
		// HTTP/1.1: one request is one Write of its head.
		ForceAttemptHTTP2: false,
		TLSNextProto:      map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := 0; i < *n; i++ {
		req, err := http.NewRequest("GET", *url, nil)
		if err != nil {
			panic(err)
		}
		req.Header.Set("Authorization", "Bearer "+os.Getenv("GO_TOKEN"))
		resp, err := client.Do(req)
		if err != nil {
			panic(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			panic(fmt.Sprintf("status %d", resp.StatusCode))
		}
	}
	fmt.Println("ok")
	if *wait {
		// Still running while the monitor reads /proc/<pid>/exe for the events.
		io.Copy(io.Discard, stdin)
	}
}
