// Starts Swagger UI on /docs. A file of its own, not an inline script: the app's Content-Security-Policy
// allows scripts from this origin only.
"use strict";
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  showExtensions: true,
  layout: "BaseLayout",
});
