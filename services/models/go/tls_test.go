package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// authority is a throwaway CA for a test, as tools/certs.py makes one for a TLS mesh.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// file is the CA certificate, PEM.
	file string
	dir  string
}

func newAuthority(t *testing.T, name string) *authority {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := certTemplate(name)
	template.IsCA = true
	template.BasicConstraintsValid = true
	template.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ca := &authority{cert: cert, key: key, dir: dir, file: filepath.Join(dir, name+".pem")}
	writePEM(t, ca.file, "CERTIFICATE", der)
	return ca
}

func certTemplate(name string) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
}

// issue signs a leaf certificate, a server's for 127.0.0.1 or a client's, and returns the
// files of the certificate and its key.
func (ca *authority) issue(t *testing.T, name string, server bool) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := certTemplate(name)
	template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if server {
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		template.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(ca.dir, name+".pem"), filepath.Join(ca.dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	return certFile, keyFile
}

func writePEM(t *testing.T, path, kind string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// clientTLS trusts ca and presents the certificate in certFile/keyFile (none when empty).
func clientTLS(t *testing.T, ca *authority, certFile, keyFile string) grpc.DialOption {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	config := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		// Presented whatever CAs the server asks for (Go's client would otherwise send none
		// that the server's CA did not sign), so the server's own verification is tested.
		config.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config))
}

// tlsEnv is the container's TLS environment: the server's certificate and key, and the
// client CA when mTLS.
func tlsEnv(serverCert, serverKey, clientCA string) map[string]string {
	env := map[string]string{envTLSCert: serverCert, envTLSKey: serverKey}
	if clientCA != "" {
		env[envTLSClientCA] = clientCA
	}
	return env
}

// refused asserts that a client dialled with options cannot call the container.
func refused(t *testing.T, endpoint, who string, options ...grpc.DialOption) {
	t.Helper()
	_, err := healthpb.NewHealthClient(dial(t, endpoint, options...)).Check(callContext(t), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("%s: got %v, want UNAVAILABLE (refused at the handshake)", who, err)
	}
}

func TestTLSVariablesGoTogether(t *testing.T) {
	cases := map[string]struct {
		env     map[string]string
		message string
	}{
		"cert without key": {map[string]string{envTLSCert: "c.pem"}, "RDV_MODEL_TLS__CERT_FILE and RDV_MODEL_TLS__KEY_FILE go together"},
		"key without cert": {map[string]string{envTLSKey: "k.pem"}, "RDV_MODEL_TLS__CERT_FILE and RDV_MODEL_TLS__KEY_FILE go together"},
		"client CA alone":  {map[string]string{envTLSClientCA: "ca.pem"}, "RDV_MODEL_TLS__CLIENT_CA_FILE (mTLS) needs RDV_MODEL_TLS__CERT_FILE"},
	}
	for name, c := range cases {
		if _, err := loadConfig(env(c.env)); err == nil || !strings.Contains(err.Error(), c.message) {
			t.Errorf("%s: got %v, want %q", name, err, c.message)
		}
	}
	// The client side of the settings is for channels a container does not open: ignored.
	config, err := loadConfig(env(map[string]string{"RDV_MODEL_TLS__CA_FILE": "ca.pem"}))
	if err != nil || config.TLS.Mode() != "off" {
		t.Errorf("client-side settings only: %+v %v", config.TLS, err)
	}
}

func TestMTLSServesOnlyClientsWithACertificateOfTheCA(t *testing.T) {
	ca := newAuthority(t, "ca")
	serverCert, serverKey := ca.issue(t, "server", true)
	clientCert, clientKey := ca.issue(t, "client", false)
	facts, conn, stop := startProcess(t, tlsEnv(serverCert, serverKey, ca.file), clientTLS(t, ca, clientCert, clientKey))

	response, err := pb.NewModelServiceClient(conn).Predict(callContext(t), request(t, 0))
	if err != nil {
		t.Fatalf("an mTLS client with the CA's certificate: %v", err)
	}
	if want := loadFixture(t).Predictions["ridge"][0]; !closeEnough(response.GetScore(), want) {
		t.Errorf("score %v, Python %v", response.GetScore(), want)
	}
	refused(t, facts.Endpoint, "a plaintext client")
	refused(t, facts.Endpoint, "a TLS client without a certificate", clientTLS(t, ca, "", ""))
	other := newAuthority(t, "other")
	otherCert, otherKey := other.issue(t, "intruder", false)
	refused(t, facts.Endpoint, "a client certificate of another CA", clientTLS(t, ca, otherCert, otherKey))
	refused(t, facts.Endpoint, "a client not trusting the server's CA", clientTLS(t, other, otherCert, otherKey))
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
}

func TestTLSWithoutAClientCAServesClientsWithoutCertificates(t *testing.T) {
	ca := newAuthority(t, "ca")
	serverCert, serverKey := ca.issue(t, "server", true)
	facts, conn, stop := startProcess(t, tlsEnv(serverCert, serverKey, ""), clientTLS(t, ca, "", ""))
	reply, err := healthpb.NewHealthClient(conn).Check(callContext(t), &healthpb.HealthCheckRequest{Service: "rendezvous.v1.ModelService"})
	if err != nil || reply.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("a TLS client: %v %v", reply, err)
	}
	refused(t, facts.Endpoint, "a plaintext client")
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
}

func TestUnreadableTLSFilesExitTwo(t *testing.T) {
	ca := newAuthority(t, "ca")
	serverCert, serverKey := ca.issue(t, "server", true)
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := map[string]struct {
		env     map[string]string
		message string
	}{
		"missing certificate": {tlsEnv("/nonexistent/server.pem", serverKey, ""), `RDV_MODEL_TLS__CERT_FILE=\"/nonexistent/server.pem\"`},
		"key of another cert": {tlsEnv(serverCert, notPEM, ""), "RDV_MODEL_TLS__KEY_FILE="},
		"client CA not PEM":   {tlsEnv(serverCert, serverKey, notPEM), "RDV_MODEL_TLS__CLIENT_CA_FILE=" + strings.ReplaceAll(`"`+notPEM+`"`, `"`, `\"`) + ": no PEM certificate in it"},
		"client CA missing":   {tlsEnv(serverCert, serverKey, "/nonexistent/ca.pem"), `RDV_MODEL_TLS__CLIENT_CA_FILE=\"/nonexistent/ca.pem\"`},
	}
	for name, c := range cases {
		var stderr strings.Builder
		code := run(callContext(t), nil, env(c.env), &stderr)
		if code != 2 || !strings.Contains(stderr.String(), "invalid configuration: ") || !strings.Contains(stderr.String(), c.message) {
			t.Errorf("%s: exit %d, stderr %s", name, code, stderr.String())
		}
	}
}
