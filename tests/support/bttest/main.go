// Command bttest runs Google's in-memory Bigtable emulator (cloud.google.com/go/bigtable/bttest)
// on 127.0.0.1, with the same flags as the Cloud SDK's cbtemulator. It is the tests' fallback
// where cbtemulator is absent; scripts/setup-test-servers builds it offline from Debian's
// golang-google-cloud-dev into .cache/bttest.
package main

import (
	"flag"
	"fmt"
	"log"

	"cloud.google.com/go/bigtable/bttest"
	"google.golang.org/grpc"
)

// Bigtable cells hold up to 10 MiB; gRPC's default 4 MiB message limit is too small.
const maxMsgSize = 256 * 1024 * 1024

func main() {
	host := flag.String("host", "127.0.0.1", "the address to bind to")
	port := flag.Int("port", 9000, "the port to listen on")
	flag.Parse()
	srv, err := bttest.NewServer(fmt.Sprintf("%s:%d", *host, *port),
		grpc.MaxRecvMsgSize(maxMsgSize), grpc.MaxSendMsgSize(maxMsgSize))
	if err != nil {
		log.Fatalf("failed to start emulator: %v", err)
	}
	fmt.Printf("Cloud Bigtable emulator running on %s\n", srv.Addr)
	select {}
}
