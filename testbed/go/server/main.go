// Go HTTPS server for the live tests: answers 200 to every request over crypto/tls,
// HTTP/1.1 only; prints "ready" once it listens.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"net"
	"net/http"
)

func main() {
	listen := flag.String("listen", "", "ip:port to listen on")
	cert := flag.String("cert", "", "certificate PEM")
	key := flag.String("key", "", "key PEM")
	flag.Parse()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		panic(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("ok\n"))
		}),
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	fmt.Println("ready")
	panic(srv.ServeTLS(ln, *cert, *key))
}
