package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc/credentials"
)

// The server side of the TLS settings every container reads (TlsSettings in
// services/core/settings.py, RDV_MODEL_TLS__*). The client side (CA_FILE, CLIENT_CERT_FILE,
// CLIENT_KEY_FILE) is for the channels a service opens; a model container opens none.
const (
	envTLSCert     = "RDV_MODEL_TLS__CERT_FILE"
	envTLSKey      = "RDV_MODEL_TLS__KEY_FILE"
	envTLSClientCA = "RDV_MODEL_TLS__CLIENT_CA_FILE"
)

// TLSConfig is the server's TLS: plaintext when CertFile is empty; with ClientCAFile,
// mTLS (a client must present a certificate that CA signed).
type TLSConfig struct {
	CertFile     string
	KeyFile      string
	ClientCAFile string
}

// Mode names the TLS for the logs: "off", "tls" or "mtls".
func (t TLSConfig) Mode() string {
	switch {
	case t.CertFile == "":
		return "off"
	case t.ClientCAFile == "":
		return "tls"
	default:
		return "mtls"
	}
}

// loadTLSConfig reads the variables and checks they go together as TlsSettings checks them.
func loadTLSConfig(getenv func(string) string) (TLSConfig, error) {
	config := TLSConfig{
		CertFile:     getenv(envTLSCert),
		KeyFile:      getenv(envTLSKey),
		ClientCAFile: getenv(envTLSClientCA),
	}
	if (config.CertFile == "") != (config.KeyFile == "") {
		return TLSConfig{}, fmt.Errorf("%s and %s go together", envTLSCert, envTLSKey)
	}
	if config.ClientCAFile != "" && config.CertFile == "" {
		return TLSConfig{}, fmt.Errorf("%s (mTLS) needs %s and %s", envTLSClientCA, envTLSCert, envTLSKey)
	}
	return config, nil
}

// serverCredentials reads the certificate, key and client CA: nil credentials when TLS is
// off. Read at start, so a missing or bad file fails the start, not the first handshake.
func (t TLSConfig) serverCredentials() (credentials.TransportCredentials, error) {
	if t.CertFile == "" {
		return nil, nil
	}
	pair, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%s=%q, %s=%q: %w", envTLSCert, t.CertFile, envTLSKey, t.KeyFile, err)
	}
	config := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if t.ClientCAFile != "" {
		pem, err := os.ReadFile(t.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("%s=%q: %w", envTLSClientCA, t.ClientCAFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s=%q: %w", envTLSClientCA, t.ClientCAFile, errors.New("no PEM certificate in it"))
		}
		config.ClientCAs = pool
		config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return credentials.NewTLS(config), nil
}
