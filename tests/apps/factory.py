"""An app factory, for the 'module:create_app()' spec form."""



def create_app(greeting="hello"):
    def app(environ, start_response):
        body = f"{greeting} from a factory\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    return app


not_callable = 42
